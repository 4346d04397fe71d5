"""Tests for mini_unlearn_jax.evaluation.privacy: default MIA, full suite, report block and `attack` CLI."""

from __future__ import annotations

import argparse
import json
import types

import jax.numpy as jnp
import numpy as np
import pytest

from mini_unlearn_jax.app import cli
from mini_unlearn_jax.app.cli import UsageError
from mini_unlearn_jax.app.cli import main as cli_main
from mini_unlearn_jax.app.data import synthetic
from mini_unlearn_jax.core.models import build_model, init_params, make_objective
from mini_unlearn_jax.core.training import TrainConfig, Trainer
from mini_unlearn_jax.evaluation import privacy as P

METRIC_KEYS = {"auc", "advantage", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "n_members", "n_nonmembers"}
N_FORGET = 60


@pytest.fixture(scope="module")
def leaky():
    """An MLP that memorizes hard, noisy synthetic data (leaky), and its retrain without the forget set."""
    ds = synthetic(n=240, n_test=300, d=20, classes=3, seed=1, sep=0.4)
    model = build_model("mlp", ds.num_classes, hidden=64)
    objective = make_objective(model, 0.0)
    cfg = TrainConfig(optimizer="adam", learning_rate=1e-2, steps=400, batch_size=None, tol=0.0, chunk=400)
    p0 = init_params(model, ds.x_train[0], 0)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    trainer = Trainer(objective, cfg)
    original = trainer.fit(p0, x, y).params
    keep = np.ones(len(x), np.float32)
    keep[:N_FORGET] = 0.0
    retrain = trainer.fit(p0, x, y, keep).params
    return types.SimpleNamespace(ds=ds, model=model, objective=objective, cfg=cfg, x=x, y=y,
                                 params={"original": original, "retrain": retrain})


def test_balanced_indices_are_deterministic_and_balanced():
    m, n = P.balanced_indices(50, 300, seed=3)
    assert len(m) == len(n) == 50 and np.array_equal(m, np.arange(50))
    assert len(np.unique(n)) == 50 and n.max() < 300 and np.all(np.diff(n) > 0)
    m2, n2 = P.balanced_indices(50, 300, seed=3)
    assert np.array_equal(n, n2)
    assert not np.array_equal(n, P.balanced_indices(50, 300, seed=4)[1])
    m, n = P.balanced_indices(80, 30, seed=0)  # fewer non-members: members are subsampled
    assert len(m) == len(n) == 30 and np.array_equal(n, np.arange(30))
    m, n = P.balanced_indices(80, 30, balance=False)
    assert len(m) == 80 and len(n) == 30
    with pytest.raises(ValueError):
        P.balanced_indices(0, 10)


def test_default_mia_shapes_and_leak(leaky):
    ds, x, y = leaky.ds, np.asarray(leaky.x), np.asarray(leaky.y)
    res = P.default_mia(leaky.objective, leaky.params, x[:N_FORGET], y[:N_FORGET], ds.x_test, ds.y_test, seed=0)
    assert set(res) == {"original", "retrain"}
    for r in res.values():
        assert METRIC_KEYS <= set(r) and r["attack"] == "loss"
        assert r["n_members"] == r["n_nonmembers"] == N_FORGET
        for k in ("auc", "advantage", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"):
            assert 0.0 <= r[k] <= 1.0
    # the memorizing model leaks, its retrain does not
    assert res["original"]["auc"] > 0.65
    assert res["original"]["auc"] > res["retrain"]["auc"] + 0.2
    assert abs(res["retrain"]["auc"] - 0.5) < 0.15
    again = P.default_mia(leaky.objective, leaky.params, x[:N_FORGET], y[:N_FORGET], ds.x_test, ds.y_test, seed=0)
    assert again == res


def test_full_suite_attacks_and_curves(leaky):
    ds, x, y = leaky.ds, np.asarray(leaky.x), np.asarray(leaky.y)

    def init_fn(key):
        return leaky.model.init(key, jnp.asarray(x[:1]))["params"]

    recipe = P.ShadowRecipe(steps=200, lr=1e-2, batch_size=None, optimizer_name="adam")
    report, curves, scores = P.full_suite(
        leaky.objective, leaky.params, x[:N_FORGET], y[:N_FORGET], ds.x_test, ds.y_test,
        init_params_fn=init_fn, recipe=recipe, num_shadows=8, x_extra=x[N_FORGET:], y_extra=y[N_FORGET:],
        seed=0, return_scores=True)
    assert report["n_members"] == report["n_nonmembers"] == N_FORGET
    assert report["shadows"]["pool_size"] == 240 + N_FORGET and report["shadows"]["num_shadows"] == 8
    for name in ("original", "retrain"):
        assert set(report["models"][name]) == set(P.SUITE_ATTACKS)
        for att, m in report["models"][name].items():
            assert 0.0 <= m["auc"] <= 1.0, (name, att)
        for att, (fpr, tpr) in curves[name].items():
            assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
            assert len(scores[name][att][0]) == N_FORGET
    orig, ret = report["models"]["original"], report["models"]["retrain"]
    assert orig["lira_online"]["auc"] > ret["lira_online"]["auc"] + 0.2
    assert orig["loss"]["auc"] > ret["loss"]["auc"] + 0.2
    gap = P.paired_auc_gap(scores["original"]["loss"], scores["retrain"]["loss"], n_boot=200)
    assert gap["gap"] == pytest.approx(orig["loss"]["auc"] - ret["loss"]["auc"], abs=1e-12)
    assert gap["lo"] <= gap["gap"] <= gap["hi"] and gap["lo"] > 0
    summary = P.summarize(report)
    assert summary["loss"]["original_gap_to_retrain"] == pytest.approx(gap["gap"])


def test_paired_auc_gap_of_identical_models_is_zero():
    rng = np.random.default_rng(0)
    s = (rng.normal(0.3, 1, 50), rng.normal(0, 1, 70))
    g = P.paired_auc_gap(s, s, n_boot=100)
    assert g["gap"] == g["lo"] == g["hi"] == 0.0
    with pytest.raises(ValueError):
        P.paired_auc_gap(s, (s[0][:10], s[1]))


def test_mia_for_report(leaky):
    problem = types.SimpleNamespace(objective=leaky.objective, x=leaky.x, y=leaky.y)
    forget = np.arange(N_FORGET)
    out = P.mia_for_report(problem, leaky.ds, forget, leaky.params["retrain"], leaky.params["retrain"],
                           leaky.params["original"])
    assert out["attack"] == "loss" and out["n_members"] == out["n_nonmembers"] == N_FORGET
    assert out["auc_gap_to_retrain"] == 0.0
    assert out["original"]["auc"] > out["retrain"]["auc"]
    json.dumps(out)  # plain JSON
    no_ref = P.mia_for_report(problem, leaky.ds, forget, leaky.params["original"], None, leaky.params["original"])
    assert "retrain" not in no_ref and "auc_gap_to_retrain" not in no_ref


# -- the `attack` subcommand ----------------------------------------------------------------


def _attack_args(argv):
    parser = argparse.ArgumentParser(prog="mini-unlearn")
    sub = parser.add_subparsers(dest="cmd", required=True)
    cli.add_attack_parser(sub)
    return parser.parse_args(["attack", *argv])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("privacy_cli")
    run, unl = root / "run", root / "unl"
    data = "synthetic:n=300,n_test=150,d=8,classes=3,sep=0.8"
    assert cli_main(["train", "--data", data, "--model", "logreg", "--l2", "1e-2", "--out", str(run)]) == 0
    assert cli_main(["unlearn", "--run", str(run), "--method", "mini", "--ratio", "0.2", "--out", str(unl)]) == 0
    return root, run, unl


@pytest.mark.slow
def test_cmd_attack_end_to_end(runs):
    root, run, unl = runs
    out = root / "attack"
    args = _attack_args(["--run", str(run), "--unlearned", str(unl), "--shadows", "4", "--shadow-steps", "30",
                         "--seed", "1", "--out", str(out)])
    assert args.func is cli.cmd_attack
    assert cli.cmd_attack(args) == 0
    assert (out / "roc.png").stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "mini" and report["n_forget"] == 60 and report["n_train"] == 300
    assert report["n_members"] == report["n_nonmembers"] == 60
    assert report["shadows"]["num_shadows"] == 4 and report["shadows"]["steps"] == 30
    assert report["shadows"]["optimizer"] == "adam" and report["shadows"]["batch_size"] is None  # L-BFGS run
    assert report["shadows"]["pool_size"] == 300 + 60  # forget + held-out + retained
    assert set(report["models"]) == {"original", "retrain", "unlearned"}
    for name in report["models"]:
        assert set(report["models"][name]) == set(P.SUITE_ATTACKS)
        for m in report["models"][name].values():
            assert 0.0 <= m["auc"] <= 1.0
    for att in ("loss", "lira_online"):
        row = report["summary_auc"][att]
        assert row["unlearned_gap_to_retrain"] == pytest.approx(row["unlearned"] - row["retrain"])
    assert not [p for p in root.iterdir() if p.name.startswith(".attack")]  # no temp dirs left


@pytest.mark.slow
def test_cmd_attack_refuses_existing_out_dir(runs):
    root, run, unl = runs
    out = root / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = _attack_args(["--run", str(run), "--unlearned", str(unl), "--out", str(out)])
    with pytest.raises(UsageError, match="already exists and is not empty"):
        cli.cmd_attack(args)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_cmd_attack_rejects_a_trained_run_as_unlearned(runs):
    root, run, _ = runs
    args = _attack_args(["--run", str(run), "--unlearned", str(run), "--out", str(root / "nope")])
    with pytest.raises(UsageError, match="not an unlearned run"):
        cli.cmd_attack(args)
    assert not (root / "nope").exists()
