"""The public entry point on models of the user's own: it refuses what cannot work, restores in
another process bit for bit, calibrates the layer that produces the logits, and handles dtypes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mini_unlearn_jax as mu
from mini_unlearn_jax.app.data import load_dataset

SPEC = "synthetic:n=600,n_test=400,d=20,classes=3,seed=1,sep=0.5"
FORGET = np.arange(0, 600, 10)


class HeadFirst(nn.Module):
    """An MLP whose head is defined first and sorts first ("classifier" < "features"), so the
    last entry of its parameter dict is not the head."""

    def setup(self):
        self.classifier = nn.Dense(3)
        self.features = nn.Dense(32)

    def __call__(self, x):
        return self.classifier(nn.relu(self.features(x.reshape((x.shape[0], -1)))))


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])


def _train(model, *, trajectory=True, steps=300):
    ds = load_dataset(SPEC)
    obj = mu.make_objective(model, 1e-5)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    p0 = model.init(jax.random.key(0), x[:1])["params"]
    cfg = mu.TrainConfig(optimizer=optax.adam, learning_rate=1e-3, steps=steps, batch_size=64)
    buf = mu.trajectory_buffer(mu.log_schedule(steps, 12)) if trajectory else None
    st = mu.Trainer(obj, cfg, trajectory=buf).fit(p0, x, y)
    return ds, obj, x, y, p0, cfg, st


def test_a_network_without_a_trajectory_is_refused_with_what_to_do():
    ds, obj, x, y, p0, cfg, st = _train(HeadFirst(), trajectory=False, steps=60)
    problem = mu.make_problem(obj, st.params, x, y, recipe=cfg, params0=p0, snapshots=st.snapshots)
    with pytest.raises(ValueError, match="trajectory_buffer.*make_problem") as e:
        mu.unlearn(problem, FORGET)
    assert "not known to be convex" in str(e.value) and "retrain" in str(e.value)
    for method in ("mini", "mini-lite", "mini-plus", "newton"):
        with pytest.raises(ValueError, match="does not apply"):
            mu.unlearn(problem, FORGET, method=method)
    assert mu.unlearn(problem, FORGET, method="retrain").converged


@pytest.mark.slow
def test_calibration_scales_the_head_even_when_it_is_defined_first():
    ds, obj, x, y, p0, cfg, st = _train(HeadFirst())
    assert list(st.params)[-1] == "features"  # what the last-entry rule would have scaled
    problem = mu.make_problem(obj, st.params, x, y, recipe=cfg, params0=p0, trajectory=st.trajectory,
                              heldout=(ds.x_test[:200], ds.y_test[:200]))
    res = mu.unlearn(problem, FORGET)
    assert res.method == "trajectory" and res.info["head"] == ["classifier"]
    # the calibrated model's logits are tau times those of its uncalibrated self: exactly the head scaled
    tau = res.info["tau"]
    uncal = jax.tree.map(lambda a: a, res.params)
    uncal["classifier"] = jax.tree.map(lambda a: a / tau, res.params["classifier"])
    xv = jnp.asarray(ds.x_test[200:260])
    np.testing.assert_allclose(obj.apply_fn(res.params, xv), tau * obj.apply_fn(uncal, xv), rtol=1e-4, atol=1e-5)
    assert tau != 1.0


RESTORE = textwrap.dedent("""
    import sys, json, jax, numpy as np, optax
    sys.path.insert(0, {tests!r})
    import test_any_model as T
    import mini_unlearn_jax as mu
    kind, path = sys.argv[1], sys.argv[2]
    ds, obj, x, y, p0, cfg = T._setting(kind)
    opt = optax.adam(1e-3) if kind == "network" else optax.lbfgs(memory_size=20)
    run = mu.load_run(path, objective=obj, like=p0, opt_like=jax.eval_shape(opt.init, p0))
    res = mu.unlearn(run.problem(x, y, recipe=cfg), T.FORGET)
    assert res.converged, res.reason
    np.save(sys.argv[3], T._flat(res.params))
    print(json.dumps({{"method": res.method, "opt_state": run.opt_state is not None}}))
""")


def _setting(kind):
    """The same objective, data and recipe in any process (the model is not pickled)."""
    ds = load_dataset(SPEC)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    if kind == "network":
        model = HeadFirst()
        obj = mu.make_objective(model, 1e-5)
        cfg = mu.TrainConfig(optimizer=optax.adam, learning_rate=1e-3, steps=300, batch_size=64)
    else:  # the fixed point's EKFAC path, with its statistics saved and restored
        model = mu.LogisticRegression(num_classes=3)
        obj = mu.make_objective(model, 1e-2)
        cfg = mu.TrainConfig(optimizer="lbfgs", steps=300, tol=1e-6)
    p0 = model.init(jax.random.key(0), x[:1])["params"]
    return ds, obj, x, y, p0, cfg


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["network", "convex"])
def test_a_restore_in_another_process_unlearns_bit_for_bit(kind, tmp_path):
    ds, obj, x, y, p0, cfg = _setting(kind)
    buf = mu.trajectory_buffer(mu.log_schedule(cfg.steps, 12)) if kind == "network" else None
    st = mu.Trainer(obj, cfg, trajectory=buf).fit(p0, x, y)
    extra = {"trajectory": st.trajectory, "heldout": (ds.x_test[:200], ds.y_test[:200])} if buf else {}
    problem = mu.make_problem(obj, st.params, x, y, recipe=cfg, params0=p0, snapshots=st.snapshots, **extra)
    here = mu.unlearn(problem, FORGET)
    assert here.method == ("trajectory" if kind == "network" else "mini") and here.converged
    mu.save_problem(tmp_path / "run", problem, opt_state=st.opt_state)
    script = RESTORE.format(tests=str(__import__("pathlib").Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", script, kind, str(tmp_path / "run"), str(tmp_path / "w.npy")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"opt_state": true' in proc.stdout.splitlines()[-1]
    np.testing.assert_array_equal(np.load(tmp_path / "w.npy"), _flat(here.params))


def test_bfloat16_parameters_are_refused_before_any_computation():
    ds = load_dataset(SPEC)
    model = mu.MLP(num_classes=3, hidden=16)
    obj = mu.make_objective(model, 1e-5)
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), model.init(jax.random.key(0), ds.x_train[:1])["params"])
    cfg = mu.TrainConfig(optimizer="adam", steps=10, batch_size=32)
    for call in (lambda: mu.Trainer(obj, cfg).fit(p16, ds.x_train, ds.y_train),
                 lambda: mu.make_problem(obj, p16, ds.x_train, ds.y_train, recipe=cfg),
                 lambda: mu.fit_stats(obj, p16, ds.x_train)):
        with pytest.raises(ValueError, match="bfloat16.*float32"):
            call()


@pytest.mark.slow
def test_bfloat16_compute_trains_and_unlearns_with_float32_parameters():
    """The supported way: float32 parameters, bfloat16 matmuls inside the model; the logits are
    upcast before the loss, so training and trajectory unlearning run as usual."""
    ds = load_dataset(SPEC)
    model = mu.MLP(num_classes=3, hidden=32)
    bf = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)
    obj = mu.make_objective(lambda p, xb: model.apply({"params": bf(p)}, xb.astype(jnp.bfloat16)), 1e-5)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    p0 = model.init(jax.random.key(0), x[:1])["params"]
    cfg = mu.TrainConfig(optimizer="adam", learning_rate=1e-3, steps=300, batch_size=64)
    st = mu.Trainer(obj, cfg, trajectory=mu.trajectory_buffer(mu.log_schedule(300, 12))).fit(p0, x, y)
    assert jax.tree.leaves(st.params)[0].dtype == jnp.float32
    assert obj.losses(st.params, x[:4], y[:4]).dtype == jnp.float32
    acc = float(jnp.mean(jnp.argmax(obj.apply_fn(st.params, jnp.asarray(ds.x_test)), -1) == ds.y_test))
    assert acc > 0.6
    problem = mu.make_problem(obj, st.params, x, y, recipe=cfg, params0=p0, trajectory=st.trajectory,
                              heldout=(ds.x_test[:200], ds.y_test[:200]))
    res = mu.unlearn(problem, FORGET)
    assert res.converged and np.all(np.isfinite(_flat(res.params)))
