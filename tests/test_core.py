"""The traceable core: unlearn_core inside a user's own jit and vmap gives unlearn's answer."""
# (chex.assert_max_traces reads a function's qualified name: a test name containing "vmap." trips it)

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mini_unlearn_jax as mu
from mini_unlearn_jax.app.data import synthetic


def _trained():
    ds = synthetic(n=600, n_test=100, d=8, classes=3, seed=2, sep=1.0)
    model = mu.build_model("logreg", 3)
    obj = mu.make_objective(model, 1e-2)
    cfg = mu.default_config("logreg", ds.n_train)
    st = mu.Trainer(obj, cfg).fit(mu.init_params(model, ds.x_train[0], 0), ds.x_train, ds.y_train)
    return ds, obj, st, mu.fit_stats(obj, st.params, ds.x_train)


@pytest.mark.slow
def test_core_composes_with_a_users_jit_and_batching():
    ds, obj, st, stats = _trained()
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    requests = [np.arange(0, 40), np.arange(100, 190), np.arange(300, 301)]
    padded = [mu.pad_request(r, ds.n_train, 128) for r in requests]
    idx = jnp.asarray(np.stack([p[0] for p in padded]))
    mask = jnp.asarray(np.stack([p[1] for p in padded]))

    # the user's own jit: the buffer, the indices and the mask are all traced
    @jax.jit
    @chex.assert_max_traces(n=1)
    def traced(params, snapshots, idx, mask):
        res = mu.unlearn_core(obj, params, snapshots, x, y, idx, mask, stats=stats)
        return res.params, res.converged

    for i, r in enumerate(requests):
        p, ok = traced(st.params, st.snapshots, idx[i], mask[i])  # every request: one trace
        want = mu.fixed_point_unlearn(obj, st.params, st.snapshots, ds.x_train, ds.y_train, r, stats=stats,
                          config=mu.MiniConfig(min_bucket=128))
        assert bool(ok)
        chex.assert_trees_all_close(p, want.params, rtol=1e-5, atol=1e-6)

    batched = jax.jit(jax.vmap(lambda i, m: mu.unlearn_core(obj, st.params, st.snapshots, x, y, i, m,
                                                            stats=stats).params))(idx, mask)
    for i, r in enumerate(requests):
        want = mu.fixed_point_unlearn(obj, st.params, st.snapshots, ds.x_train, ds.y_train, r, stats=stats,
                          config=mu.MiniConfig(min_bucket=128))
        chex.assert_trees_all_close(jax.tree.map(lambda a, i=i: a[i], batched), want.params, rtol=1e-4, atol=1e-5)


def test_core_does_not_raise_and_returns_input_on_failure():
    ds, obj, st, stats = _trained()
    x = np.array(ds.x_train)
    x[3, 0] = np.nan  # a removed example with NaN features makes the solve fail
    idx, mask = mu.pad_request(np.array([3, 4, 5]), ds.n_train, 64)
    res = jax.jit(lambda i, m: mu.unlearn_core(obj, st.params, st.snapshots, jnp.asarray(x), ds.y_train, i, m,
                                               stats=stats))(idx, mask)
    assert not bool(res.converged)
    for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(st.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_objectives_of_equal_linen_modules_are_equal_and_share_compiled_programs():
    """Two objectives made from equal flax.linen modules compare and hash equal (so a program
    compiled for one, keyed on the objective as a static argument, serves the other); another
    width or another L2 is another objective."""
    make = lambda hidden, l2=1e-3: mu.make_objective(mu.build_model("mlp", 3, hidden=hidden), l2)
    a, b = make(8), make(8)
    assert a is not b and a == b and hash(a) == hash(b)
    assert a != make(9) and a != make(8, l2=1e-2)
    x = jnp.ones((4, 5))
    params = mu.init_params(mu.build_model("mlp", 3, hidden=8), x[0], 0)
    traces = []

    def logits(obj, p):
        traces.append(obj)  # runs once per trace, not per call
        return obj.logits(p, x)

    f = jax.jit(logits, static_argnums=0)
    np.testing.assert_array_equal(f(a, params), f(b, params))
    assert len(traces) == 1  # b reused the program traced for a


def test_a_linen_module_with_unhashable_attributes_still_makes_a_usable_objective():
    """flax cannot hash a module holding a list (layer widths, say): its objective is compared by
    the module's identity, and the library's compiled programs, keyed on the objective, still run."""
    import flax.linen as nn

    class Net(nn.Module):
        widths: list

        @nn.compact
        def __call__(self, x):
            for w in self.widths:
                x = nn.relu(nn.Dense(w)(x))
            return nn.Dense(3)(x)

    module = Net([8, 8])
    a, b = mu.make_objective(module, 1e-3), mu.make_objective(module, 1e-3)
    assert a == b and hash(a) == hash(b)  # the same module object
    assert a != mu.make_objective(Net([8, 8]), 1e-3)  # another one, which flax cannot compare by value
    ds = synthetic(n=60, d=5, classes=3, seed=0)
    params0 = mu.init_params(module, ds.x_train[0], 0)
    cfg = mu.TrainConfig(optimizer="adam", learning_rate=1e-2, steps=5, batch_size=20, snapshots=0)
    state = mu.Trainer(a, cfg).fit(params0, ds.x_train, ds.y_train)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state.params))
    assert int(state.step) == 5
