import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

from mini_unlearn_jax.app.data import synthetic
from mini_unlearn_jax.core.models import build_model, init_params, make_objective
from mini_unlearn_jax.core.snapshots import nbytes, ordered, snapshot_buffer
from mini_unlearn_jax.core.training import TrainConfig, Trainer


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 5), every=st.integers(1, 4), steps=st.integers(0, 20))
def test_snapshot_buffer_keeps_newest_selected_steps(size, every, steps):
    buf = snapshot_buffer(size, every)
    p = {"w": jnp.zeros(3)}
    state = buf.init(p)
    update = jax.jit(buf.update)  # one compile per example (eagerly, every call traced its cond anew)
    for t in range(steps):
        state = update(state, t, {"w": jnp.full(3, float(t))}, {"w": jnp.full(3, -float(t))})
    selected = [t for t in range(steps) if t % every == 0]
    expect = selected[-size:]
    got = ordered(state)
    assert list(np.asarray(got.steps)) == expect
    np.testing.assert_array_equal(np.asarray(got.params["w"])[:, 0], np.array(expect, float))
    np.testing.assert_array_equal(np.asarray(got.grads["w"])[:, 0], -np.array(expect, float))
    assert state.steps.shape == (size,)  # fixed shape whatever was written
    assert nbytes(state) == size * 4 + 2 * size * 3 * 4 + 4


def test_forced_snapshot_and_jit():
    buf = snapshot_buffer(2, every=10)
    p = {"w": jnp.zeros(2)}
    upd = jax.jit(buf.update)
    state = upd(buf.init(p), 3, {"w": jnp.ones(2)}, {"w": jnp.ones(2)}, True)
    state = upd(state, 4, {"w": jnp.ones(2)}, {"w": jnp.ones(2)}, False)
    assert int(state.count) == 1 and list(np.asarray(ordered(state).steps)) == [3]


def test_masked_full_batch_training_equals_training_on_the_subset():
    ds = synthetic(n=200, d=4, classes=3, seed=2)
    model = build_model("logreg", 3)
    obj = make_objective(model, 1e-2)
    cfg = TrainConfig(optimizer="lbfgs", steps=300, tol=1e-7)
    p0 = init_params(model, ds.x_train[0], 0)
    keep = np.ones(200, np.float32)
    keep[::5] = 0
    a = Trainer(obj, cfg).fit(p0, ds.x_train, ds.y_train, keep)
    b = Trainer(obj, cfg).fit(p0, ds.x_train[keep > 0], ds.y_train[keep > 0])
    np.testing.assert_allclose(ravel_pytree(a.params)[0], ravel_pytree(b.params)[0], atol=2e-4)
    assert float(a.grad_norm) < 1e-5


@pytest.mark.slow
def test_minibatch_training_records_full_data_gradient_and_is_deterministic():
    ds = synthetic(n=100, d=4, classes=3, seed=5)
    model = build_model("mlp", 3, hidden=8)
    obj = make_objective(model, 1e-3)
    cfg = TrainConfig(optimizer="adam", learning_rate=1e-2, steps=30, batch_size=16, snapshots=3, snapshot_every=10, chunk=7)
    p0 = init_params(model, ds.x_train[0], 1)
    s1 = Trainer(obj, cfg).fit(p0, ds.x_train, ds.y_train)
    s2 = Trainer(obj, cfg).fit(p0, ds.x_train, ds.y_train)
    np.testing.assert_array_equal(ravel_pytree(s1.params)[0], ravel_pytree(s2.params)[0])  # bitwise
    snaps = ordered(s1.snapshots)
    assert list(np.asarray(snaps.steps)) == [10, 20, 30]  # the final state is always recorded
    w_last = jax.tree.map(lambda a: a[-1], snaps.params)
    g_last = jax.tree.map(lambda a: a[-1], snaps.grads)
    np.testing.assert_allclose(ravel_pytree(w_last)[0], ravel_pytree(s1.params)[0])
    g_ref = jax.grad(obj.data_loss)(s1.params, jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
    np.testing.assert_allclose(ravel_pytree(g_last)[0], ravel_pytree(g_ref)[0], rtol=1e-4, atol=1e-6)


def test_rewriting_the_newest_step_replaces_it():
    """A final force=True on a step the schedule already took overwrites that entry (no duplicate
    slot); the older entries stay."""
    buf = snapshot_buffer(3, every=2)
    p = lambda v: {"w": jnp.full(2, v)}
    state = buf.init(p(0.0))
    for t in (0, 2, 4):
        state = buf.update(state, t, p(float(t)), p(-float(t)))
    state = buf.update(state, 4, p(40.0), p(-40.0), force=True)
    got = ordered(state)
    assert int(state.count) == 3 and list(np.asarray(got.steps)) == [0, 2, 4]
    np.testing.assert_array_equal(np.asarray(got.params["w"])[:, 0], [0.0, 2.0, 40.0])
    np.testing.assert_array_equal(np.asarray(got.grads["w"])[:, 0], [-0.0, -2.0, -40.0])
