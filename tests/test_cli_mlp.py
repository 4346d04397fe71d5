"""The command line on a network: `train --model mlp` (or `cnn`) keeps a trajectory buffer, and
`unlearn --method mini` runs trajectory unlearning on it, end to end."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from mini_unlearn_jax.app import cli, recipes
from mini_unlearn_jax.app.checkpoint import load_run

pytestmark = pytest.mark.slow  # end-to-end: the quick tier (-m "not slow") leaves it out

SPEC = "synthetic:n=600,n_test=400,d=20,classes=3,seed=1,sep=0.5"


def _json(capsys, argv) -> tuple[int, dict]:
    capsys.readouterr()
    code = cli.main(argv)
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_mlp")
    run = root / "run"
    assert cli.main(["train", "--data", SPEC, "--model", "mlp", "--hidden", "64", "--l2", "1e-5",
                     "--steps", "300", "--batch-size", "64", "--out", str(run)]) == 0
    return root, run


def test_train_keeps_a_log_spaced_trajectory_and_a_held_out_split(trained):
    _, run_dir = trained
    run = load_run(run_dir)
    meta = run.meta["trajectory"]
    sched = meta["schedule"]
    assert len(sched) == recipes.TRAJECTORY_SIZE and sched[0] == 0 and sched[-1] == 300
    assert list(np.asarray(run.trajectory.steps)) == sched  # every slot written, at its step
    assert len(meta["val_indices"]) == min(recipes.VALIDATION_SIZE, 400 // 2) and len(meta["profile"]) == len(sched)
    assert np.all(np.diff(sched) > 0) and sched[1] - sched[0] < sched[-1] - sched[-2]  # dense early
    # the last slot is the trained model itself
    last = {k: np.asarray(v)[-1] for k, v in run.trajectory.params["Dense_1"].items()}
    np.testing.assert_array_equal(last["kernel"], np.asarray(run.params["Dense_1"]["kernel"]))
    assert cli.nonmember_indices(run.meta, 400).size == 400 - len(meta["val_indices"])


def test_mini_on_an_mlp_is_trajectory_unlearning_close_to_retraining(trained, capsys):
    root, run_dir = trained
    out = root / "unl"
    code, rep = _json(capsys, ["unlearn", "--run", str(run_dir), "--ratio", "0.2", "--compare-retrain", "--mia",
                               "--out", str(out), "--json"])
    assert code == 0 and rep["converged"], rep["reason"]
    assert rep["method"] == "mini" and rep["details"]["solver"] == "trajectory"
    assert rep["convex"] is False
    assert 0 <= rep["details"]["rewind_step"] < 300
    # the rewound run retrains 15 % of the recipe's steps: far less than retraining's 300
    assert rep["details"]["steps"] == round(0.15 * 300)  # TrajectoryConfig().budget of the 300 steps
    assert abs(rep["test_acc"] - rep["retrain_test_acc"]) < 0.05
    # test metrics and MIA non-members never include the held-out split the method read
    n_unread = 400 - len(load_run(run_dir).meta["trajectory"]["val_indices"])
    assert rep["n_test"] == n_unread and rep["mia"]["n_nonmembers"] <= n_unread
    # train's own test accuracy is on the same images, so it is the original's figure in unlearn's report
    meta = load_run(run_dir).meta
    assert meta["n_test"] == n_unread and meta["test_acc"] == pytest.approx(rep["original_test_acc"], abs=1e-9)
    # a second request on the result: the refreshed trajectory travels with it
    out2 = root / "unl2"
    code, rep2 = _json(capsys, ["unlearn", "--run", str(out), "--ratio", "0.1", "--out", str(out2), "--json"])
    assert code == 0 and rep2["details"]["solver"] == "trajectory"
    second = load_run(out2)
    assert second.trajectory is not None and len(second.meta["ledger"]) == 2
    # its last slot is the new model (the next request's calibration target); the early slots stay
    np.testing.assert_array_equal(np.asarray(second.trajectory.params["Dense_1"]["kernel"])[-1],
                                  np.asarray(second.params["Dense_1"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(second.trajectory.params["Dense_0"]["kernel"])[:3],
                                  np.asarray(load_run(run_dir).trajectory.params["Dense_0"]["kernel"])[:3])


@pytest.mark.parametrize("method", ["mini-lite", "mini-plus", "newton"])
def test_convex_only_solvers_are_refused_on_an_mlp(trained, capsys, method):
    """On a network the fixed point is (nearly) the trained model: running it would report a
    no-op as converged, so it is refused before anything is written, saying what to use."""
    root, run_dir = trained
    capsys.readouterr()
    code = cli.main(["unlearn", "--run", str(run_dir), "--method", method, "--ratio", "0.1",
                     "--out", str(root / method)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT and "not known to be convex" in err and "trajectory" in err
    assert not (root / method).exists()


def test_method_help_lists_the_registry():
    from mini_unlearn_jax.core import registry as R

    sub = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["unlearn"].format_help().split())
    for name in R.METHODS:
        assert f"{name}:" in sub  # every registered method, with its summary


def test_train_heldout_sets_the_split_the_method_reads(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--data", SPEC, "--model", "mlp", "--hidden", "32", "--steps", "60", "--batch-size",
                     "64", "--heldout", "120", "--out", str(run)]) == 0
    vi = load_run(run).meta["trajectory"]["val_indices"]
    assert len(vi) == 120 and len(set(vi)) == 120 and min(vi) >= 0 and max(vi) < 400
    code, rep = _json(capsys, ["unlearn", "--run", str(run), "--ratio", "0.1", "--out", str(tmp_path / "u"), "--json"])
    assert code == 0 and rep["n_test"] == 400 - 120  # test metrics on the other 280
    assert len(rep["details"]["gap_se"]) == len(rep["details"]["gaps"])


@pytest.mark.parametrize("argv, message", [
    (["--model", "logreg", "--heldout", "100"], "keeps no trajectory buffer"),
    (["--model", "mlp", "--steps", "20", "--batch-size", "64", "--heldout", "201"], "must lie in [2, 200]"),
])
def test_train_heldout_bad_values_are_refused_before_training(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert cli.main(["train", "--data", SPEC, *argv, "--out", str(out)]) == 1  # a usage error
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_unlearn_budget_sets_the_retraining_steps(trained, capsys):
    root, run_dir = trained
    code, rep = _json(capsys, ["unlearn", "--run", str(run_dir), "--ratio", "0.1", "--budget", "0.3",
                               "--out", str(root / "budget"), "--json"])
    assert code == 0 and rep["details"]["solver"] == "trajectory"
    assert rep["details"]["budget"] == 0.3 and rep["details"]["steps"] == round(0.3 * 300)


@pytest.fixture(scope="module")
def logreg_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli_logreg") / "run"
    assert cli.main(["train", "--data", SPEC, "--model", "logreg", "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize("which, argv, message", [
    ("mlp", ["--budget", "0"], "in (0, 1]"),
    ("mlp", ["--budget", "1.5"], "in (0, 1]"),
    ("mlp", ["--budget", "0.3", "--method", "retrain"], "does not retrain along a trajectory"),
    ("logreg", ["--budget", "0.3"], "keeps no trajectory buffer"),
])
def test_unlearn_budget_bad_uses_are_refused_before_loading(trained, logreg_run, tmp_path, capsys, which, argv,
                                                              message):
    run = trained[1] if which == "mlp" else logreg_run
    out = tmp_path / "out"
    assert cli.main(["unlearn", "--run", str(run), "--ratio", "0.1", *argv, "--out", str(out)]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_the_cnn_trains_and_is_unlearned_along_its_trajectory_from_the_command_line(tmp_path, capsys):
    """`train --model cnn` (the benchmark's residual CNN, on 8 x 8 images here) keeps a trajectory
    buffer and one gradient snapshot, reloads as a CLI run, and `unlearn` runs trajectory
    unlearning on it; tabular rows are refused with what to use instead."""
    spec = "synthetic:n=300,n_test=200,d=64,classes=3,seed=1,sep=0.5"
    run = tmp_path / "cnn"
    assert cli.main(["train", "--data", spec, "--model", "cnn", "--l2", "0", "--steps", "60",
                     "--out", str(run)]) == 0
    loaded = load_run(run)
    assert loaded.meta["model"] == "cnn" and loaded.meta["train_config"]["lr_schedule"] == "cosine"
    assert loaded.meta["train_config"]["snapshots"] == 1 and loaded.trajectory is not None
    assert sum(a.size for a in jax.tree.leaves(loaded.params)) == loaded.meta["param_count"]
    code, rep = _json(capsys, ["unlearn", "--run", str(run), "--ratio", "0.1", "--out", str(tmp_path / "u"), "--json"])
    assert code == 0 and rep["converged"], rep["reason"]
    assert rep["method"] == "mini" and rep["details"]["solver"] == "trajectory" and rep["convex"] is False
    assert load_run(tmp_path / "u").meta["model"] == "cnn"
    capsys.readouterr()
    assert cli.main(["train", "--data", "synthetic:n=100,d=10,classes=2", "--model", "cnn",
                     "--out", str(tmp_path / "tab")]) == cli.EXIT_BAD_INPUT
    assert "for tabular data use logreg or mlp" in capsys.readouterr().err and not (tmp_path / "tab").exists()
