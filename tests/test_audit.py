"""`mini-unlearn audit`: a loss-threshold membership attack on every parameter set a run stores
(model, trajectory and snapshot slots, params0), FAIL when one remembers the forget set better
than the model does."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import roc_auc_score

from mini_unlearn_jax.app import cli
from mini_unlearn_jax.app.audit import check_forget_indices, stored_param_sets
from mini_unlearn_jax.app.checkpoint import load_run
from mini_unlearn_jax.core.models import LogisticRegression, init_params, make_objective
from mini_unlearn_jax.evaluation import audit as AU
from mini_unlearn_jax.evaluation.privacy import balanced_indices

# -- a tiny problem: logistic regression memorising random labels ------------------------------


def _problem(classes: int = 3, n: int = 40, n_non: int = 60, d: int = 80, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, classes, n).astype(np.int32)
    x_non = rng.normal(size=(n_non, d)).astype(np.float32)
    y_non = rng.integers(0, classes, n_non).astype(np.int32)
    model = LogisticRegression(num_classes=classes)
    objective = make_objective(model, 1e-4)
    fresh = init_params(model, x[0], 0)  # zero kernel: every example has the same loss
    opt = optax.adam(0.05)

    @jax.jit
    def fit(p):
        def step(carry, _):
            p, s = carry
            g = jax.grad(objective.value)(p, jnp.asarray(x), jnp.asarray(y))
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (p, opt.init(p)), None, length=300)[0][0]

    return objective, fresh, fit(fresh), (x, y), (x_non, y_non)


@pytest.fixture(scope="module")
def tiny():
    return _problem()


def test_a_stored_set_that_memorises_fails_the_audit_and_the_reverse_passes(tiny):
    objective, fresh, memo, (x, y), (xn, yn) = tiny
    sets = {"model": fresh, "trajectory[3] step 9": memo, "params0": fresh}
    bad = AU.audit_params(objective, sets, x, y, xn, yn,
                          steps={"trajectory[3] step 9": 9, "params0": 0})
    assert bad.verdict == "FAIL" and not bad.passed
    assert bad.model_auc == pytest.approx(0.5)  # all losses tied
    assert [r.name for r in bad.failing] == ["trajectory[3] step 9"]
    assert bad.worst.name == "trajectory[3] step 9" and bad.worst.step == 9 and bad.worst.auc > 0.9
    assert bad.n_members == bad.n_nonmembers == 40 and bad.balanced
    good = AU.audit_params(objective, {"model": memo, "trajectory[0] step 0": fresh}, x, y, xn, yn)
    assert good.verdict == "PASS" and good.failing == () and good.worst.name == "model"
    # the tolerance is what decides: the memorising slot is within a tolerance larger than its gap
    lax = AU.audit_params(objective, {"model": fresh, "slot": memo}, x, y, xn, yn, tolerance=0.6)
    assert lax.passed
    d = bad.to_dict()
    assert json.loads(json.dumps(d))["verdict"] == "FAIL"
    assert len(d["rows"]) == 3 and d["n_failing"] == 1


def test_row_auc_is_sklearns_auc_of_minus_the_loss(tiny):
    objective, fresh, memo, (x, y), (xn, yn) = tiny
    half = jax.tree.map(lambda a, b: (a + b) / 2, fresh, memo)
    sets = {"model": memo, "half": half}
    whole = AU.audit_params(objective, sets, x, y, xn, yn, balance=False)
    balanced = AU.audit_params(objective, sets, x, y, xn, yn, seed=3)
    mem, non = balanced_indices(len(x), len(xn), seed=3)
    for name, params in sets.items():
        lf = np.asarray(objective.losses(params, jnp.asarray(x), jnp.asarray(y)))
        ln = np.asarray(objective.losses(params, jnp.asarray(xn), jnp.asarray(yn)))
        row = next(r for r in whole.rows if r.name == name)
        labels = np.r_[np.ones(lf.size), np.zeros(ln.size)]
        assert row.auc == pytest.approx(roc_auc_score(labels, -np.r_[lf, ln]), abs=1e-9)
        row = next(r for r in balanced.rows if r.name == name)
        labels = np.r_[np.ones(mem.size), np.zeros(non.size)]
        assert row.auc == pytest.approx(roc_auc_score(labels, -np.r_[lf[mem], ln[non]]), abs=1e-9)
    assert whole.n_nonmembers == len(xn) and balanced.n_nonmembers == len(x)


def test_batched_scores_match_one_set_at_a_time_and_do_not_saturate():
    objective, fresh, memo, (x, y), (xn, yn) = _problem(classes=2)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), fresh, memo)
    out = AU.stacked_scores(objective, stacked, x, y, chunk=7)  # 40 examples in padded chunks of 7
    for k, params in enumerate((fresh, memo)):  # the score is phi, with loss = softplus(-phi)
        losses = np.asarray(objective.losses(params, jnp.asarray(x), jnp.asarray(y)))
        np.testing.assert_allclose(np.logaddexp(0.0, -out[k]), losses, rtol=2e-5, atol=1e-6)
    # a confident model (head scaled 100x): float32 cross-entropy rounds to 0 for most examples,
    # the audit's score does not, and with two classes the ranking (so the AUC) is the unscaled one
    loud = jax.tree.map(lambda a: a * 100.0, memo)
    assert np.mean(np.asarray(objective.losses(loud, jnp.asarray(x), jnp.asarray(y))) == 0) > 0.5
    rep = AU.audit_params(objective, {"model": memo, "loud": loud}, x, y, xn, yn)
    assert rep.rows[1].auc == pytest.approx(rep.rows[0].auc, abs=1e-12) and rep.model_auc > 0.75
    # where float32 losses would tie the confidently fit members at 0 and lose that
    mem, non = balanced_indices(len(x), len(xn))
    lf = np.asarray(objective.losses(loud, jnp.asarray(x[mem]), jnp.asarray(y[mem])))
    ln = np.asarray(objective.losses(loud, jnp.asarray(xn[non]), jnp.asarray(yn[non])))
    saturated = roc_auc_score(np.r_[np.ones(lf.size), np.zeros(ln.size)], -np.r_[lf, ln])
    assert saturated < rep.rows[1].auc - 0.02


def test_audit_params_refuses_bad_arguments(tiny):
    objective, fresh, memo, (x, y), (xn, yn) = tiny
    with pytest.raises(ValueError, match="for the model"):
        AU.audit_params(objective, {"trained": memo}, x, y, xn, yn)
    with pytest.raises(ValueError, match="tolerance"):
        AU.audit_params(objective, {"model": memo}, x, y, xn, yn, tolerance=-0.1)
    with pytest.raises(ValueError, match="at least one member"):
        AU.audit_params(objective, {"model": memo}, x[:0], y[:0], xn, yn)


def test_forget_indices_are_checked():
    assert check_forget_indices(np.array([5, 1, 3]), 10).tolist() == [1, 3, 5]
    for bad, msg in (([1, 10], r"\[0, 10\)"), ([-1], r"\[0, 10\)"), ([2, 2], "duplicates"),
                     ([], "empty"), (np.array([1.0]), "integers"), (np.zeros((2, 2), int), "1-D")):
        with pytest.raises(ValueError, match=msg):
            check_forget_indices(np.asarray(bad), 10)


# -- the command, end to end on a small MLP run ------------------------------------------------

SPEC = "synthetic:n=400,n_test=400,d=20,classes=4,seed=3"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    run = root / "R"
    assert cli.main(["train", "--data", SPEC, "--model", "mlp", "--hidden", "64", "--steps", "300",
                     "--out", str(run)]) == 0
    forget = np.sort(np.random.default_rng(0).choice(400, 40, replace=False))
    np.save(root / "F.npy", forget)
    return root, run, forget


def _audit(capsys, argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["audit", *argv])
    got = capsys.readouterr()
    return code, got.out, got.err


def _check_consistent(code: int, rep: dict, run_dir) -> None:
    assert code == (0 if rep["verdict"] == "PASS" else cli.EXIT_AUDIT_FAIL)
    names = [r["name"] for r in rep["rows"]]
    assert names[0] == "model" and rep["model"] == "model"
    run = load_run(run_dir)
    steps = np.asarray(run.trajectory.steps).tolist()
    expected = [f"trajectory[{i}] step {s}" for i, s in enumerate(steps) if s >= 0]
    assert [n for n in names if n.startswith("trajectory[")] == expected
    n_snap = int(np.sum(np.asarray(run.snapshots.steps) >= 0))
    assert sum(n.startswith("snapshots[") for n in names) == n_snap
    auc = {r["name"]: r["auc"] for r in rep["rows"]}
    failing = [n for n in names if n != "model" and auc[n] > rep["model_auc"] + rep["tolerance"]]
    assert rep["n_failing"] == len(failing) and (rep["verdict"] == "FAIL") == bool(failing)
    assert rep["worst"]["auc"] == max(auc.values()) and rep["model_auc"] == auc["model"]


@pytest.mark.slow
def test_audit_of_the_trained_run(trained, capsys):
    root, run_dir, forget = trained
    before = sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*"))
    code, out, err = _audit(capsys, [str(run_dir), "--forget", str(root / "F.npy"), "--json"])
    rep = json.loads(out)
    _check_consistent(code, rep, run_dir)
    # before unlearning the forget examples are still in the run: audited, and said so
    assert rep["n_forget"] == 40 and rep["n_not_removed"] == 40 and rep["run_kind"] == "trained"
    assert "have not been removed" in rep["notes"][0] and "have not been removed" in err
    # non-members as `unlearn` and `attack` choose them (the 200 outside the held-out split),
    # balanced: 40 of them
    assert rep["n_nonmember_pool"] == cli.nonmember_indices(load_run(run_dir).meta, 400).size == 200
    assert rep["n_members"] == 40 and rep["n_nonmembers"] == 40
    # the last trajectory slot is the model itself
    assert rep["rows"][len(load_run(run_dir).trajectory.steps)]["auc"] == rep["model_auc"]
    # the table: a header, a rule, one line per row, the verdict line
    code2, table, _ = _audit(capsys, [str(run_dir), "--forget", str(root / "F.npy")])
    lines = table.strip().splitlines()
    assert code2 == code and len(lines) == len(rep["rows"]) + 3
    assert lines[0].split()[:2] == ["artefact", "step"]
    assert lines[2].split()[:3] == ["model", "300", f"{rep['model_auc']:.3f}"]
    assert lines[-1].startswith(rep["verdict"] + ":")
    assert sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*")) == before


@pytest.mark.slow
def test_audit_of_an_unlearned_run(trained, capsys):
    root, run_dir, forget = trained
    unl = root / "U"
    capsys.readouterr()
    forget_file = str(root / "F.npy")
    argv = ["unlearn", "--run", str(run_dir), "--forget", forget_file, "--out", str(unl)]
    assert cli.main(argv) == 0
    code, out, err = _audit(capsys, [str(unl), "--forget", forget_file, "--json"])
    rep = json.loads(out)
    _check_consistent(code, rep, unl)
    assert rep["n_not_removed"] == 0 and rep["notes"] == [] and rep["run_kind"] == "unlearned"
    # a tolerance of 1 never fails
    code, out, _ = _audit(capsys, [str(unl), "--forget", forget_file, "--tolerance", "1", "--json"])
    assert code == 0 and json.loads(out)["verdict"] == "PASS"


@pytest.mark.slow
def test_bad_input_exits_1_with_a_message(trained, capsys, tmp_path):
    root, run_dir, _ = trained
    out_of_range = tmp_path / "far.txt"
    out_of_range.write_text("3\n400\n")
    dup = tmp_path / "dup.npy"
    np.save(dup, np.array([3, 3]))
    cases = [([str(run_dir), "--forget", str(out_of_range)], "[0, 400)"),
             ([str(run_dir), "--forget", str(dup)], "duplicates"),
             ([str(tmp_path / "no-run"), "--forget", str(root / "F.npy")], "does not exist"),
             ([str(run_dir), "--forget", str(tmp_path / "missing.npy")], "not found"),
             ([str(run_dir), "--forget", str(root / "F.npy"), "--tolerance", "-1"], "--tolerance")]
    for argv, msg in cases:
        code, out, err = _audit(capsys, argv)
        assert code == cli.EXIT_BAD_INPUT and out == "", (argv, out)
        assert "mini-unlearn audit: error:" in err and msg in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dup.npy", "far.txt"]  # nothing written


@pytest.mark.slow
def test_stored_param_sets_names_every_written_slot(trained):
    _, run_dir, _ = trained
    run = load_run(run_dir)
    sets, steps = stored_param_sets(run)
    assert steps["model"] == 300 and "params0" not in sets  # the CLI does not save params0
    snap = [k for k in sets if k.startswith("snapshots[")]
    assert [steps[k] for k in snap] == sorted(steps[k] for k in snap)  # oldest first
    assert len(sets) == 1 + len(np.asarray(run.trajectory.steps)) + len(snap)
