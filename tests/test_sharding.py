"""Sharded unlearning over 8 host CPU devices equals the single-device result."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.flatten_util import ravel_pytree
    from jax.sharding import Mesh
    import mini_unlearn_jax as mu
    assert len(jax.devices()) == 8, jax.devices()
    ds = mu.load_dataset("synthetic:n=400,d=6,classes=3,seed=2")
    model = mu.build_model("logreg", 3); obj = mu.make_objective(model, 1e-2)
    p0 = mu.init_params(model, ds.x_train[0], 0)
    st = mu.Trainer(obj, mu.default_config("logreg", 400)).fit(p0, ds.x_train, ds.y_train)
    stats = mu.fit_stats(obj, st.params, ds.x_train)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    forget = np.arange(0, 400, 3)
    outs = {}
    for name, cfg in (("single", mu.MiniConfig(chunk=64)), ("sharded", mu.MiniConfig(chunk=64, mesh=mesh))):
        r = mu.fixed_point_unlearn(obj, st.params, st.snapshots, ds.x_train, ds.y_train, forget, stats=stats, config=cfg)
        assert bool(r.converged), r.reason()
        outs[name] = np.asarray(ravel_pytree(r.params)[0])
    np.testing.assert_allclose(outs["sharded"], outs["single"], rtol=1e-5, atol=1e-6)
    # the sharded program really spreads the removed examples' chunks over the 8 devices
    from mini_unlearn_jax.core.mini import removed_grad_sum
    from jax.sharding import NamedSharding, PartitionSpec as P
    xr = jax.device_put(jnp.asarray(ds.x_train[:128]), NamedSharding(mesh, P("data")))
    f = jax.jit(lambda p, x: removed_grad_sum(obj, p, x, jnp.asarray(ds.y_train[:128]), jnp.ones(128), 64, mesh))
    hlo = f.lower(st.params, xr).compile().as_text()
    assert "all-reduce" in hlo or "reduce-scatter" in hlo
    g1 = removed_grad_sum(obj, st.params, jnp.asarray(ds.x_train[:128]), jnp.asarray(ds.y_train[:128]), jnp.ones(128), 64)
    np.testing.assert_allclose(ravel_pytree(f(st.params, xr))[0], ravel_pytree(g1)[0], rtol=1e-5, atol=1e-6)
    # LiRA shadow models: the shadow axis sharded over the mesh gives the same models
    from mini_unlearn_jax.evaluation import lira
    init = lambda k: jax.tree.map(lambda a: a + 0.01 * jax.random.normal(k, a.shape), p0)
    kw = dict(num_shadows=8, steps=20, lr=0.05)
    s1 = lira.train_shadow_models(obj, init, ds.x_train[:200], ds.y_train[:200], jax.random.key(3), **kw)
    s8 = lira.train_shadow_models(obj, init, ds.x_train[:200], ds.y_train[:200], jax.random.key(3), mesh=mesh, **kw)
    np.testing.assert_array_equal(s1.in_mask, s8.in_mask)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
    assert len(jax.tree.leaves(s8.params)[0].sharding.device_set) == 8
    print("SHARDED-OK")
""")


@pytest.mark.slow
def test_sharded_equals_single_device():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert "SHARDED-OK" in proc.stdout, proc.stderr[-3000:]
