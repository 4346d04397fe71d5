import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mini_unlearn_jax.app.checkpoint import is_run, load_run
from mini_unlearn_jax.app.cli import main
from mini_unlearn_jax.app.data import load_dataset
from mini_unlearn_jax.core import registry as R
from mini_unlearn_jax.evaluation.metrics import predict_probs

SPEC = "synthetic:n=300,n_test=100,d=6,classes=3,seed=3"


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "trained"
    assert main(["train", "--data", SPEC, "--model", "logreg", "--l2", "1e-2", "--out", str(out)]) == 0
    return out


def test_train_writes_a_loadable_run(run_dir):
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["kind"] == "trained" and meta["n_train"] == 300 and meta["final_grad_norm"] < 1e-4
    assert meta["snapshot_buffer_bytes"] > 0 and meta["curvature_stats_bytes"] > 0
    run = load_run(run_dir)
    assert run.removed.size == 0 and run.stats is not None


@pytest.mark.slow
def test_unlearn_end_to_end_with_compare_and_export(run_dir, tmp_path, capsys):
    before = tree_digest(run_dir)
    out = tmp_path / "u"
    probs = tmp_path / "p.npz"
    rc = main(["unlearn", "--run", str(run_dir), "--method", "mini", "--ratio", "0.3", "--seed", "1",
               "--compare-retrain", "--mia", "--out", str(out), "--export-probs", str(probs)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    for model in ("original", "retrain", "unlearned"):
        assert set(report["mia"][model]) >= {"auc", "advantage", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"}
        assert 0.0 <= report["mia"][model]["auc"] <= 1.0
    assert report["mia"]["attack"] == "loss" and report["mia"]["n_members"] == 90
    for key in ("method", "ratio", "n_train", "n_removed", "time_s", "compile_s", "test_acc", "forget_acc",
                "retain_acc", "converged", "retrain_time_s", "rel_param_error", "kl_test", "kl_forget",
                "agreement_test"):
        assert key in report, key
    assert report["converged"] and report["n_removed"] == 90 and report["n_train"] == 300
    assert report["rel_param_error"] < 1.0 and report["kl_test"] < report["original_kl_test"]
    z = np.load(probs)
    assert z["test"].shape == (100, 3) and z["forget"].shape == (90, 3) and z["forget_indices"].shape == (90,)
    np.testing.assert_allclose(z["test"].sum(1), 1.0, rtol=1e-5)
    # each row says which test image it is: the probabilities are those of the unlearned model there
    ds = load_dataset(load_run(run_dir).meta["data_spec"])
    unl = load_run(out)
    np.testing.assert_array_equal(z["test_indices"], np.arange(100))  # a logreg run reads no test image
    np.testing.assert_allclose(z["test"], predict_probs(unl.objective, unl.params, ds.x_test[z["test_indices"]]),
                               rtol=1e-4, atol=1e-6)
    assert tree_digest(run_dir) == before  # the trained run is never modified
    assert is_run(out) and load_run(out).removed.size == 90
    # same --ratio and --seed draw the same forget set
    out2 = tmp_path / "u2"
    assert main(["unlearn", "--run", str(run_dir), "--method", "retrain", "--ratio", "0.3", "--seed", "1",
                 "--out", str(out2)]) == 0
    np.testing.assert_array_equal(load_run(out2).removed, load_run(out).removed)


@pytest.mark.slow
def test_restore_in_a_separate_process(run_dir, tmp_path):
    forget = tmp_path / "f.npy"
    np.save(forget, np.array([3, 10, 200], np.int64))
    out = tmp_path / "sub"
    proc = subprocess.run([sys.executable, "-m", "mini_unlearn_jax", "unlearn", "--run", str(run_dir), "--method",
                           "mini", "--forget", str(forget), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["n_removed"] == 3 and report["converged"]


def test_sequential_requests_and_ledger(run_dir, tmp_path, capsys):
    first = tmp_path / "first"
    np.save(tmp_path / "a.npy", np.arange(0, 30))
    np.save(tmp_path / "b.npy", np.arange(25, 60))
    np.save(tmp_path / "c.npy", np.arange(30, 60))
    assert main(["unlearn", "--run", str(run_dir), "--method", "mini", "--forget", str(tmp_path / "a.npy"),
                 "--out", str(first)]) == 0
    capsys.readouterr()
    rc = main(["unlearn", "--run", str(first), "--method", "mini", "--forget", str(tmp_path / "b.npy"),
               "--out", str(tmp_path / "second")])
    assert rc == 1 and "already removed" in capsys.readouterr().err
    assert not (tmp_path / "second").exists()
    assert main(["unlearn", "--run", str(first), "--method", "mini", "--forget", str(tmp_path / "c.npy"),
                 "--out", str(tmp_path / "second")]) == 0
    run = load_run(tmp_path / "second")
    np.testing.assert_array_equal(np.sort(run.removed), np.arange(60))
    capsys.readouterr()
    assert main(["info", str(tmp_path / "second")]) == 0
    text = capsys.readouterr().out
    assert "2 request(s), 60 examples removed" in text


def _err(capsys, argv):
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("extra,msg", [
    (["--method", "bogus", "--ratio", "0.1"], "unknown --method"),
    (["--method", "mini"], "exactly one of --ratio"),
    (["--method", "mini", "--ratio", "0.1", "--forget", "x.npy"], "exactly one of --ratio"),
    (["--method", "mini", "--ratio", "0"], "strictly between 0 and 1"),
    (["--method", "mini", "--ratio", "1.0"], "strictly between 0 and 1"),
    (["--method", "mini", "--ratio", "-0.2"], "strictly between 0 and 1"),
    (["--method", "mini", "--forget", "missing.npy"], "not found"),
])
def test_unlearn_bad_arguments(run_dir, tmp_path, capsys, extra, msg):
    out = tmp_path / "o"
    rc, err = _err(capsys, ["unlearn", "--run", str(run_dir), "--out", str(out)] + extra)
    assert rc == 1 and msg in err
    assert not out.exists()


@pytest.mark.parametrize("content,msg", [
    (np.array([1, 1, 2]), "duplicates"), (np.array([-3]), "lie in"), (np.array([300]), "lie in"),
    (np.array([0.5]), "integers"), (np.array([], np.int64), "empty"), (np.arange(300), "all 300"),
])
def test_unlearn_bad_forget_files(run_dir, tmp_path, capsys, content, msg):
    f = tmp_path / "f.npy"
    np.save(f, content)
    rc, err = _err(capsys, ["unlearn", "--run", str(run_dir), "--method", "mini", "--forget", str(f), "--out", str(tmp_path / "o")])
    assert rc == 1 and msg in err and not (tmp_path / "o").exists()


def test_pickled_forget_file_is_refused(run_dir, tmp_path, capsys):
    f = tmp_path / "f.npy"
    np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    rc, err = _err(capsys, ["unlearn", "--run", str(run_dir), "--method", "mini", "--forget", str(f), "--out", str(tmp_path / "o")])
    assert rc == 1 and "pickled objects" in err


def test_existing_outputs_are_protected(run_dir, tmp_path, capsys):
    rc, err = _err(capsys, ["train", "--data", SPEC, "--model", "logreg", "--out", str(run_dir)])
    assert rc == 1 and "never overwritten" in err
    out = tmp_path / "o"
    assert main(["unlearn", "--run", str(run_dir), "--method", "mini", "--ratio", "0.1", "--out", str(out)]) == 0
    capsys.readouterr()
    rc, err = _err(capsys, ["unlearn", "--run", str(run_dir), "--method", "mini", "--ratio", "0.2", "--out", str(out)])
    assert rc == 1 and "--overwrite" in err
    assert load_run(out).removed.size == 30
    assert main(["unlearn", "--run", str(run_dir), "--method", "mini", "--ratio", "0.2", "--out", str(out), "--overwrite"]) == 0
    assert load_run(out).removed.size == 60
    rc, err = _err(capsys, ["unlearn", "--run", str(run_dir), "--method", "mini", "--ratio", "0.2", "--out", str(run_dir / "x")])
    assert rc == 1 and "never modified" in err


@pytest.mark.slow
def test_data_fingerprint_mismatch_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.normal(size=(60, 3)), y_train=rng.integers(0, 2, 60),
                  x_test=rng.normal(size=(20, 3)), y_test=rng.integers(0, 2, 20))
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    run = tmp_path / "r"
    assert main(["train", "--data", f"npz:{path}", "--model", "logreg", "--out", str(run)]) == 0
    arrays["x_train"][0, 0] += 1.0
    np.savez(path, **arrays)
    capsys.readouterr()
    rc, err = _err(capsys, ["unlearn", "--run", str(run), "--method", "mini", "--ratio", "0.1", "--out", str(tmp_path / "o")])
    assert rc == 1 and "fingerprint mismatch" in err


def test_missing_and_corrupted_checkpoints(run_dir, tmp_path, capsys):
    import shutil

    rc, err = _err(capsys, ["unlearn", "--run", str(tmp_path / "nope"), "--method", "mini", "--ratio", "0.1", "--out", str(tmp_path / "o")])
    assert rc == 1 and "does not exist" in err
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    victims = [p for p in (broken / "ckpt").rglob("*") if p.is_file() and p.stat().st_size > 0 and "state" in str(p)]
    assert victims
    for p in victims:
        p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 3)])
    rc, err = _err(capsys, ["unlearn", "--run", str(broken), "--method", "mini", "--ratio", "0.1", "--out", str(tmp_path / "o")])
    assert rc == 1 and ("truncated or corrupted" in err or "corrupted" in err)
    (broken / "run.json").write_text("{not json")
    rc, err = _err(capsys, ["unlearn", "--run", str(broken), "--method", "mini", "--ratio", "0.1", "--out", str(tmp_path / "o")])
    assert rc == 1 and "corrupted" in err
    assert not (tmp_path / "o").exists()


def test_non_converged_result_exits_2_and_saves_no_model(run_dir, tmp_path, monkeypatch, capsys):
    real = R.run_method

    def failing(name, problem, forget, **kw):
        out = real(name, problem, forget, **kw)
        return out._replace(converged=False, reason="the map is not contractive here (test)", params=problem.params)

    monkeypatch.setattr(R, "run_method", failing)
    out = tmp_path / "o"
    rc = main(["unlearn", "--run", str(run_dir), "--method", "mini", "--ratio", "0.1", "--out", str(out)])
    assert rc == 2
    report = json.loads((out / "report.json").read_text())
    assert report["converged"] is False and "not contractive" in report["reason"]
    assert not is_run(out) and not (out / "ckpt").exists()


# Runs the CLI in a fresh interpreter that pauses (for the test to kill it) at one point of the
# save: "before" the move into place (app/atomic.py's _move_into_place), or "between" its two
# renames (just after the old result was renamed aside). The pause comes from here, not the library.
PAUSING_CLI = r"""
import os, sys, time
from pathlib import Path
from mini_unlearn_jax.app import atomic
from mini_unlearn_jax.app.cli import main
where, flag, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
def pause():
    flag.write_text("paused")
    time.sleep(600)
if where == "before":
    real_move = atomic._move_into_place
    def move(tmp, path, **kw):
        pause()
        return real_move(tmp, path, **kw)
    atomic._move_into_place = move
else:
    real_rename = os.rename
    def rename(src, dst):
        real_rename(src, dst)
        if ".old-" in Path(dst).name:
            pause()
    os.rename = rename
sys.exit(main(argv))
"""


@pytest.mark.slow
def test_interrupted_unlearn_leaves_no_valid_result(run_dir, tmp_path):
    """Kill `unlearn` while it saves: the output path never holds a half-written directory. A new
    output does not appear; a replaced one still holds the old complete result (killed between
    the renames: the old one is aside, and the next touch puts it back); nothing else is touched."""
    (tmp_path / "mine.txt").write_text("precious")

    def killed_unlearn(out: Path, where: str, *extra: str) -> None:
        flag = tmp_path / f"paused-{where}"
        args = ["unlearn", "--run", str(run_dir), "--method", "mini", "--ratio", "0.2", "--out", str(out), *extra]
        proc = subprocess.Popen([sys.executable, "-c", PAUSING_CLI, where, str(flag), *args],
                                env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        import time

        deadline = time.time() + 240
        while time.time() < deadline and not flag.exists() and proc.poll() is None:
            time.sleep(0.2)
        proc.kill()
        _, err = proc.communicate()
        assert flag.exists(), f"the save never reached the pause: {err[-2000:]}"

    fresh = tmp_path / "killed"
    killed_unlearn(fresh, "before")
    partial = [p for p in tmp_path.glob(".killed.partial-*") if (p / "run.json").exists()]
    assert partial and not fresh.exists() and not is_run(fresh)  # complete, but never moved into place

    out = tmp_path / "u"
    assert main(["unlearn", "--run", str(run_dir), "--method", "mini", "--ratio", "0.1", "--out", str(out)]) == 0
    old = tree_digest(out)
    killed_unlearn(out, "before", "--overwrite")
    assert tree_digest(out) == old and load_run(out).removed.size == 30
    killed_unlearn(out, "between", "--overwrite")
    (aside,) = tmp_path.glob(".u.old-*")
    assert not out.exists() and tree_digest(aside) == old  # the gap: the old result complete, aside
    assert is_run(out) and tree_digest(out) == old and load_run(out).removed.size == 30
    assert not aside.exists() and (tmp_path / "mine.txt").read_text() == "precious"


@pytest.mark.slow
def test_the_report_says_whether_the_model_is_convex(run_dir, tmp_path):
    """An MLP's unlearning report says the model is not convex and names the solver that ran
    (trajectory unlearning for `mini`); a logistic-regression one says it is convex."""
    mlp_run = tmp_path / "mlp"
    assert main(["train", "--data", SPEC, "--model", "mlp", "--hidden", "8", "--l2", "1e-3",
                 "--out", str(mlp_run)]) == 0
    assert main(["unlearn", "--run", str(mlp_run), "--method", "mini", "--ratio", "0.1",
                 "--out", str(tmp_path / "u_mlp")]) == 0
    report = json.loads((tmp_path / "u_mlp" / "report.json").read_text())
    assert report["convex"] is False and report["details"]["solver"] == "trajectory"
    assert main(["unlearn", "--run", str(run_dir), "--method", "mini", "--ratio", "0.1",
                 "--out", str(tmp_path / "u_lr")]) == 0
    report = json.loads((tmp_path / "u_lr" / "report.json").read_text())
    assert report["convex"] is True and report["details"]["solver"] == "fixed-point"
