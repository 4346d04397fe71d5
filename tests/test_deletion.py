"""Deletion means deletion: what an unlearned run stores holds nothing of the trained run that
was computed over the removed examples -- no snapshot of the original trajectory after the
rewind point, no gradient-buffer entry, no optimizer state (checked by value)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mini_unlearn_jax.app import cli
from mini_unlearn_jax.app.checkpoint import load_run
from mini_unlearn_jax.core import trajectory as tj

SPEC = "synthetic:n=600,n_test=400,d=20,classes=3,seed=1,sep=0.5"


def _rows(tree) -> np.ndarray:
    """``[K, |w|]``: the slots of a stacked parameter tree, one flat row each."""
    leaves = [np.asarray(a) for a in jax.tree.leaves(tree)]
    return np.concatenate([a.reshape(a.shape[0], -1) for a in leaves], axis=1)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])


def _is_one_of(row, rows) -> bool:
    return any(np.array_equal(row, r) for r in rows)


@pytest.mark.parametrize("K,k,B", [(12, 3, 240), (12, 0, 45), (12, 10, 5), (6, 1, 3), (12, 5, 2)])
def test_phase_schedule_places_the_later_slots_along_the_phase(K, k, B):
    steps = jnp.asarray([0, 1, 2, 4, 9, 18, 36, 75, 150, 300, 620, 1600][:K], jnp.int32).at[K - 1].set(1600)
    w = np.asarray(tj.phase_schedule(steps, k, B))
    assert np.all(w[: k + 1] == 0)  # kept slots are never rewritten
    later = w[k + 1:]
    assert later[-1] == B  # the last slot is the phase's end
    assert np.all(np.diff(later) > 0) and np.all(later <= B)
    if B >= K - 1 - k:  # enough phase steps: every later slot is written
        assert np.all(later >= 1)


def _train(root, name="run"):
    run = root / name
    assert cli.main(["train", "--data", SPEC, "--model", "mlp", "--hidden", "32", "--l2", "1e-5",
                     "--steps", "300", "--batch-size", "64", "--out", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("deletion")
    return root, _train(root)


def _unlearn(capsys, run, out, *extra):
    capsys.readouterr()
    code = cli.main(["unlearn", "--run", str(run), "--ratio", "0.2", "--out", str(out), "--json", *extra])
    rep = json.loads(capsys.readouterr().out)
    assert code == 0, rep["reason"]
    return rep


@pytest.mark.slow
def test_trajectory_unlearning_keeps_no_snapshot_of_the_original_after_the_rewind_point(trained, capsys):
    root, run_dir = trained
    rep = _unlearn(capsys, run_dir, root / "unl")
    assert rep["details"]["solver"] == "trajectory"
    orig, unl = load_run(run_dir), load_run(root / "unl")
    k = rep["details"]["rewind_index"]
    old, new = _rows(orig.trajectory.params), _rows(unl.trajectory.params)
    K = old.shape[0]
    np.testing.assert_array_equal(new[: k + 1], old[: k + 1])  # up to the rewind point: the original's
    for j in range(k + 1, K):
        assert not _is_one_of(new[j], old), j
    np.testing.assert_array_equal(new[-1], _flat(unl.params))  # the last slot is the unlearned model
    steps = np.asarray(unl.trajectory.steps)
    assert np.all(steps[: k + 1] == np.asarray(orig.trajectory.steps)[: k + 1])
    # later slots are labelled by optimizer steps along the new trajectory: rewind step + phase step
    assert np.all(np.diff(steps) > 0) and steps[-1] == steps[k] + rep["details"]["steps"]
    assert unl.meta["trajectory"]["profile"] != orig.meta["trajectory"]["profile"]

    # the gradient snapshot buffer holds no entry of the trained run's, and the optimizer state
    # is the optimizer's initial state at the new parameters (no moments over the removed examples)
    old_s, new_s = _rows(orig.snapshots.params), _rows(unl.snapshots.params)
    for j in range(new_s.shape[0]):
        assert not _is_one_of(new_s[j], old_s[np.asarray(orig.snapshots.steps) >= 0]), j
    for a in jax.tree.leaves(unl.opt_state):
        if np.ndim(a) > 0 and np.size(a) > 1:  # Adam's moments
            assert not np.any(np.asarray(a))

    # the next request rewinds along the new trajectory, never to a slot of the original after k
    rep2 = _unlearn(capsys, root / "unl", root / "unl2")
    assert rep2["details"]["solver"] == "trajectory"
    assert rep2["details"]["snapshot_steps"] == [int(s) for s in steps]


@pytest.mark.slow
def test_fixed_point_unlearning_keeps_no_buffer_entry_of_the_trained_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--data", "synthetic:n=500,n_test=200,d=8,classes=3,seed=2", "--model", "logreg",
                     "--out", str(run)]) == 0
    rep = _unlearn(capsys, run, tmp_path / "unl")
    assert rep["details"]["solver"] == "fixed-point"
    orig, unl = load_run(run), load_run(tmp_path / "unl")
    old = _rows(orig.snapshots.params)
    new, steps = _rows(unl.snapshots.params), np.asarray(unl.snapshots.steps)
    assert int(unl.snapshots.count) == 1 and np.sum(steps >= 0) == 1  # EKFAC reads only the newest entry
    for j in range(new.shape[0]):
        assert not _is_one_of(new[j], old), j
        if steps[j] < 0:
            assert not np.any(new[j]) and not np.any(_rows(unl.snapshots.grads)[j])
    np.testing.assert_array_equal(new[steps >= 0][0], _flat(unl.params))
    # the curvature statistics are refitted at the new model on the remaining data
    assert not all(np.array_equal(a, b) for a, b in zip(orig.stats, unl.stats, strict=True))
    # L-BFGS's memory of curvature pairs (over the removed examples) is not carried over
    assert not any(np.array_equal(a, b) and np.size(a) > 1 and np.any(a)
                   for a, b in zip(jax.tree.leaves(orig.opt_state), jax.tree.leaves(unl.opt_state), strict=True))


@pytest.mark.slow
def test_methods_that_rebuild_no_trajectory_keep_only_the_initialisation(trained, capsys):
    root, run_dir = trained
    orig = load_run(run_dir)
    old = _rows(orig.trajectory.params)
    _unlearn(capsys, run_dir, root / "ft", "--method", "finetune")
    ft = load_run(root / "ft")
    steps, new = np.asarray(ft.trajectory.steps), _rows(ft.trajectory.params)
    assert steps[0] == 0 and np.all(steps[1:-1] == -1) and steps[-1] == np.asarray(orig.trajectory.steps)[-1]
    np.testing.assert_array_equal(new[0], old[0])  # the initialisation, which saw no data
    assert not np.any(new[1:-1])
    np.testing.assert_array_equal(new[-1], _flat(ft.params))

    # retraining records its own trajectory on the recipe's schedule
    _unlearn(capsys, run_dir, root / "re", "--method", "retrain")
    re = load_run(root / "re")
    np.testing.assert_array_equal(np.asarray(re.trajectory.steps), np.asarray(orig.trajectory.steps))
    new = _rows(re.trajectory.params)
    np.testing.assert_array_equal(new[0], old[0])
    for j in range(1, new.shape[0]):
        assert not _is_one_of(new[j], old), j
    np.testing.assert_array_equal(new[-1], _flat(re.params))
