"""A user's own flax model and optax loop: train, save, restore in another process, unlearn with
every applicable method through the public API (issue 13)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import mini_unlearn_jax as mu

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _user_model as U  # noqa: E402

FORGET = np.arange(0, 240, 8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    x, y = U.data()
    p0 = U.init(x)
    w, buf = jax.jit(U.train)(p0, x, y)
    run_dir = tmp_path_factory.mktemp("user") / "run"
    mu.save_run(run_dir, params=w, snapshots=buf, objective=U.objective(), params0=p0,
                meta={"note": "trained by tests/_user_model.py"})
    return run_dir, w, buf, p0


def test_buffer_recorded_the_steps_it_should(saved):
    _, w, buf, _ = saved
    # every EVERY-th step of 300, newest K, plus the forced final write at step 300 (written twice:
    # once as a multiple of EVERY and once forced)
    steps = np.asarray(mu.core.snapshots.ordered(buf).steps)
    assert steps[-1] == U.STEPS and steps.shape == (U.K,)
    np.testing.assert_array_equal(steps[:-1] % U.EVERY, 0)
    newest_params, newest_grad = mu.core.snapshots.latest(buf)
    chex_equal = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), newest_params, w)
    assert all(jax.tree.leaves(chex_equal))
    x, y = U.data()
    expect = mu.data_grad_fn(U.objective(), x, y)(w)
    for a, b in zip(jax.tree.leaves(newest_grad), jax.tree.leaves(expect), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_buffer_refuses_a_gradient_of_the_wrong_shape():
    p = {"w": np.zeros((3, 2), np.float32)}
    buf = mu.snapshot_buffer(2)
    with pytest.raises(ValueError, match="tree structure and shapes"):
        buf.update(buf.init(p), 0, p, {"w": np.zeros((2, 3), np.float32)})


def test_restore_needs_the_users_objective_and_tree(saved):
    run_dir, *_ = saved
    with pytest.raises(mu.app.checkpoint.CheckpointError, match="your own model"):
        mu.load_run(run_dir)
    x, _ = U.data()
    with pytest.raises(mu.app.checkpoint.CheckpointError, match="example_loss saved"):
        mu.load_run(run_dir, objective=U.objective(U.other_loss), like=U.init(x))
    with pytest.raises(ValueError, match="objective="):
        mu.save_run(run_dir.parent / "no_obj", params=saved[1], snapshots=saved[2])
    assert not (run_dir.parent / "no_obj").exists()


@pytest.mark.slow
def test_every_applicable_method_runs_in_another_process(saved):
    run_dir, w, _, p0 = saved
    proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).parent / "_user_model.py"), "restore",
                           str(run_dir)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    # restored values are copies: exactly the saved parameters
    for a, b in zip(out["saved_params"], jax.tree.leaves(w), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b))
    assert set(out["methods"]) == set(out["results"]) | set(out["skipped"])
    # the recipe is a function: the methods that need the optimizer say so, the others run; the
    # trajectory method needs a trajectory buffer this loop did not keep
    minibatch = {"neggrad-plus", "l1-sparse", "salun", "scrub", "from-init"}
    assert set(out["skipped"]) == {"finetune", "deltagrad", "trajectory", "mini-exact"} | minibatch
    assert all("mini-batch" in out["skipped"][m] for m in minibatch)
    assert "logistic regression" in out["skipped"]["mini-exact"]  # the user model is not logreg
    assert "TrainConfig" in out["skipped"]["finetune"] and "TrainConfig" in out["skipped"]["deltagrad"]
    assert "trajectory buffer" in out["skipped"]["trajectory"]
    assert {"mini", "mini-lite", "mini-plus", "retrain", "newton", "neggrad"} <= set(out["results"])
    # the oracle: retraining with the user's recipe here, in this process
    x, y = U.data()
    keep = np.ones(240, np.float32)
    keep[FORGET] = 0
    ref = U.recipe(p0, x, y, keep)
    flat = lambda leaves: np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in leaves])
    w_ref, w_star = flat(jax.tree.leaves(ref)), flat(jax.tree.leaves(w))
    assert out["results"]["retrain"]["converged"]
    np.testing.assert_allclose(flat(out["results"]["retrain"]["params"]), w_ref, rtol=1e-4, atol=1e-5)
    mini = out["results"]["mini"]
    assert mini["converged"], mini["reason"]
    rel = np.linalg.norm(flat(mini["params"]) - w_ref) / np.linalg.norm(w_star - w_ref)
    assert rel < 0.1, rel  # a strongly convex model: mini lands close to retraining (0.02 when written)
    with pytest.raises(ValueError, match="does not apply"):
        mu.run_method("finetune", mu.load_run(run_dir, objective=U.objective(), like=p0).problem(x, y, U.recipe),
                      FORGET)
