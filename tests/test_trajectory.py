"""Trajectory unlearning: the log-spaced snapshot policy and the method on a tiny MLP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from mini_unlearn_jax.app.data import synthetic
from mini_unlearn_jax.core import methods as M
from mini_unlearn_jax.core import registry as R
from mini_unlearn_jax.core import trajectory as TJ
from mini_unlearn_jax.core.models import build_model, init_params, make_objective
from mini_unlearn_jax.core.training import TrainConfig, Trainer

# -- the snapshot policy ---------------------------------------------------------------------


def test_log_schedule_keeps_early_steps_at_fixed_size():
    s = TJ.log_schedule(1600, 12)
    assert s == (0, 1, 2, 4, 9, 19, 40, 84, 175, 366, 765, 1600)
    for total, size in ((10, 11), (50, 8), (100, 3), (7, 2)):
        s = TJ.log_schedule(total, size)
        assert len(s) == size and s[0] == 0 and s[-1] == total
        assert all(b > a for a, b in zip(s, s[1:], strict=False))
    assert TJ.log_schedule(10, 11) == tuple(range(11))  # collisions pushed up: every step kept
    with pytest.raises(ValueError):
        TJ.log_schedule(5, 8)
    with pytest.raises(ValueError):
        TJ.trajectory_buffer((0, 3, 3))


@pytest.mark.parametrize("with_opt", [False, True])
def test_buffer_has_fixed_shapes_and_keeps_exactly_the_scheduled_steps(with_opt):
    schedule = TJ.log_schedule(40, 6)
    buf = TJ.trajectory_buffer(schedule, with_opt_state=with_opt)
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros((2,))}
    opt = {"m": jnp.zeros((3, 2))}
    state = buf.init(params, opt)

    def body(s, t):  # params and optimizer state carry the step number itself
        p = jax.tree.map(lambda a: jnp.full_like(a, t), params)
        o = jax.tree.map(lambda a: jnp.full_like(a, -t), opt)
        s2 = buf.update(s, t, p, o)
        assert jax.tree.map(jnp.shape, s2) == jax.tree.map(jnp.shape, s)  # fixed shapes inside scan
        return s2, None

    state, _ = jax.lax.scan(body, state, jnp.arange(41))
    np.testing.assert_array_equal(state.steps, schedule)
    assert state.params["w"].shape == (6, 3, 2) and state.params["b"].shape == (6, 2)
    np.testing.assert_array_equal(state.params["b"][:, 0], np.asarray(schedule, np.float32))
    if with_opt:
        np.testing.assert_array_equal(state.opt_state["m"][:, 0, 0], -np.asarray(schedule, np.float32))
    else:
        assert state.opt_state == ()
    # a step outside the schedule changes nothing
    off = next(t for t in range(41) if t not in schedule)
    same = buf.update(state, off, jax.tree.map(lambda a: a + 99, params), opt)
    assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(state), strict=True))


def test_unwritten_slots_are_marked():
    buf = TJ.trajectory_buffer((1, 5, 10))
    s = buf.update(buf.init({"w": jnp.zeros(2)}), 5, {"w": jnp.ones(2)})
    np.testing.assert_array_equal(s.steps, [-1, 5, -1])
    assert int(TJ.select_snapshot(jnp.zeros(3), s.steps, 0.1)) == 1  # only written, non-final slots


def test_init_records_the_initial_parameters_when_the_schedule_starts_at_0():
    w0 = {"w": jnp.arange(3.0)}
    s = TJ.trajectory_buffer((0, 5, 10)).init(w0)
    np.testing.assert_array_equal(s.steps, [0, -1, -1])
    np.testing.assert_array_equal(s.params["w"][0], w0["w"])


def test_select_snapshot_takes_the_latest_unmemorised_one():
    steps = jnp.arange(6)
    gaps = jnp.asarray([0.0, 0.005, 0.03, 0.0, 0.2, 0.5])
    assert int(TJ.select_snapshot(gaps, steps, 0.01)) == 3  # latest <= threshold, noise at 2 tolerated
    assert int(TJ.select_snapshot(gaps.at[:4].set(1.0), steps, 0.01)) == 0  # none: the initialisation
    assert int(TJ.select_snapshot(jnp.zeros(6), steps, 0.01)) == 4  # never the final snapshot


def test_rule_gaps_let_the_forget_set_override_the_profile_only_beyond_its_noise():
    profile = jnp.asarray([0.0, 0.01, 0.05])
    se = jnp.asarray([0.02, 0.02, 0.02])
    # within two standard errors of the profile: sampling noise, the profile stands
    np.testing.assert_allclose(TJ.rule_gaps(jnp.asarray([0.03, 0.04, 0.06]), se, profile, 2.0), profile)
    # beyond them (a memorised subgroup): the forget set's gap less the margin
    np.testing.assert_allclose(TJ.rule_gaps(jnp.asarray([0.10, 0.01, 0.30]), se, profile, 2.0), [0.06, 0.01, 0.26])
    # no margin: the larger of the two, as before the margin existed
    np.testing.assert_allclose(TJ.rule_gaps(jnp.asarray([0.03, 0.0, 0.06]), se, profile, 0.0), [0.03, 0.01, 0.06])
    # no profile (-inf): the forget set's own gap, without a margin
    fg = jnp.asarray([0.03, 0.04, 0.06])
    np.testing.assert_allclose(TJ.rule_gaps(fg, se, jnp.full((3,), -jnp.inf), 2.0), fg)


def test_memorisation_gaps_and_standard_errors_match_numpy():
    rng = np.random.default_rng(1)
    obj = make_objective(build_model("logreg", 3), 0.0)
    params = init_params(build_model("logreg", 3), np.zeros(4, np.float32), 0)
    traj = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=(2, *a.shape)), a.dtype), params)  # two random snapshots
    x, y = jnp.asarray(rng.normal(size=(40, 4)), jnp.float32), jnp.asarray(rng.integers(0, 3, 40))
    mask = jnp.asarray((np.arange(40) < 25).astype(np.float32))  # 25 real rows, 15 padding
    xv, yv = x[:10] + 1.0, y[:10]
    gaps, se, hse = TJ.memorisation_gaps(obj, traj, x, y, mask, xv, yv)
    for k in range(2):
        p = jax.tree.map(lambda a, k=k: a[k], traj)
        pf = np.exp(-np.asarray(obj.losses(p, x, y)))[:25]
        pv = np.exp(-np.asarray(obj.losses(p, xv, yv)))
        np.testing.assert_allclose(float(gaps[k]), pf.mean() - pv.mean(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(se[k]), pf.std(ddof=1) / np.sqrt(25), rtol=1e-4)
    # the held-out standard error (the rule's noise): sample s.d. of the held-out probabilities / sqrt(10)
    assert hse.shape == (2,)
    for k in range(2):
        pv = np.exp(-np.asarray(obj.losses(jax.tree.map(lambda a, k=k: a[k], traj), xv, yv)))
        np.testing.assert_allclose(float(hse[k]), pv.std(ddof=1) / np.sqrt(10), rtol=1e-4)


def test_fit_temperature_matches_the_target_loss_on_the_overconfident_branch():
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(300, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 5, 300))
    ce = lambda t: float(jnp.mean(jax.vmap(lambda a, b: -jax.nn.log_softmax(a)[b])(t * z, y)))
    target = ce(3.0)
    tau = float(TJ.fit_temperature(z, y, jnp.asarray(target)))
    assert abs(ce(tau) - target) < 1e-4 and tau > 1.0
    low = float(TJ.fit_temperature(z, y, jnp.asarray(0.0)))  # below the minimum: the minimiser
    assert ce(low) <= min(ce(t) for t in np.linspace(0.01, 3, 60)) + 1e-4


# -- training and the method on a tiny MLP ------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    ds = synthetic(n=300, n_test=600, d=20, classes=4, seed=3, sep=0.45)
    model = build_model("mlp", 4, hidden=64)
    obj = make_objective(model, 1e-5)
    cfg = TrainConfig(optimizer="adam", learning_rate=3e-3, steps=400, batch_size=32, tol=0.0, seed=0,
                      snapshots=4, snapshot_every=100, chunk=400)
    p0 = init_params(model, ds.x_train[0], 0)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    st, traj = TJ.train_with_trajectory(obj, cfg, p0, x, y, size=10)
    problem = M.Problem(obj, cfg, p0, st.params, None, None, x, y)
    return ds, obj, cfg, problem, traj


@pytest.mark.slow
def test_training_with_the_buffer_is_the_trainers_recipe_bit_for_bit(tiny):
    ds, obj, cfg, problem, traj = tiny
    ref = Trainer(obj, cfg).fit(problem.params0, ds.x_train, ds.y_train)
    np.testing.assert_array_equal(ravel_pytree(ref.params)[0], ravel_pytree(problem.params)[0])
    np.testing.assert_array_equal(traj.steps, TJ.log_schedule(cfg.steps, 10))
    np.testing.assert_array_equal(ravel_pytree(TJ.snapshot(traj, 9))[0], ravel_pytree(problem.params)[0])
    np.testing.assert_array_equal(ravel_pytree(TJ.snapshot(traj, 0))[0], ravel_pytree(problem.params0)[0])


def _forget_loss(obj, params, x, y):
    return float(jnp.mean(obj.losses(params, x, y)))


@pytest.mark.slow
def test_method_on_a_tiny_mlp_against_retraining(tiny):
    ds, obj, cfg, problem, traj = tiny
    forget = np.arange(0, 300, 5)  # 20 %
    xv, yv = jnp.asarray(ds.x_test[:300]), jnp.asarray(ds.y_test[:300])
    xt, yt = ds.x_test[300:], ds.y_test[300:]
    profile = TJ.memorisation_profile(obj, traj, problem.x, problem.y, xv, yv)
    assert profile.shape == (10,) and float(profile[-1]) > 0.1  # the original fits its training set better than unseen data
    out = TJ.run_trajectory(problem, forget, trajectory=traj, x_val=xv, y_val=yv, profile=profile)
    ret = R.run_method("retrain", problem, forget)
    assert out.converged and 0 <= out.info["rewind_step"] < cfg.steps
    assert out.info["steps"] == 60  # budget 0.15 of 400 steps
    # the rule's noise is reported with its choice: the held-out standard error of every snapshot's gap
    np.testing.assert_allclose(out.info["gap_se"], np.asarray(TJ.memorisation_gaps(obj, traj.params, xv, yv, jnp.ones(len(yv)), xv, yv)[2]), rtol=1e-5)
    k = out.info["rewind_index"]
    assert f"standard error {out.info['gap_se'][k]:.3f}" in out.reason and out.info["gap_se"][-1] > 0
    xf, yf = problem.x[forget], problem.y[forget]
    lf = {k: _forget_loss(obj, p, xf, yf) for k, p in
          (("original", problem.params), ("retrain", ret.params), ("unlearned", out.params))}
    # the original has memorised the forget set; the unlearned model treats it like retraining does
    assert lf["original"] < 0.2 * lf["retrain"]
    assert lf["unlearned"] > 0.7 * lf["retrain"]
    acc = lambda p: float(jnp.mean(jnp.argmax(obj.apply_fn(p, jnp.asarray(xt)), -1) == jnp.asarray(yt)))
    assert acc(out.params) > acc(ret.params) - 0.05
    # calibration: the unlearned model's held-out loss is the original's
    np.testing.assert_allclose(_forget_loss(obj, out.params, xv, yv), _forget_loss(obj, problem.params, xv, yv),
                               rtol=1e-3)
    # calibrate, the step behind it: a model already at the target's held-out loss keeps temperature 1
    again, tau = TJ.calibrate(obj, out.params, problem.params, xv, yv)
    np.testing.assert_allclose(float(tau), 1.0, atol=1e-3)
    np.testing.assert_allclose(_forget_loss(obj, again, xv, yv), _forget_loss(obj, problem.params, xv, yv), rtol=1e-3)


def test_a_new_request_size_reuses_the_compiled_program(tiny):
    ds, obj, cfg, problem, traj = tiny
    xv, yv = jnp.asarray(ds.x_test[:300]), jnp.asarray(ds.y_test[:300])
    TJ.run_trajectory(problem, np.arange(10), trajectory=traj, x_val=xv, y_val=yv)
    again = TJ.run_trajectory(problem, np.arange(0, 300, 3), trajectory=traj, x_val=xv, y_val=yv)
    assert again.compile_s == 0.0 and again.converged


def test_keeping_a_trajectory_leaves_training_and_its_gradient_buffer_unchanged(tiny):
    """What `train --model mlp` and build_problem(trajectory=True) run: the Trainer with a trajectory
    buffer next to its gradient buffer gives the same w* and the same gradient snapshots, bit for bit."""
    from mini_unlearn_jax.core.snapshots import trajectory_buffer

    ds, obj, cfg, problem, _ = tiny
    plain = Trainer(obj, cfg).fit(problem.params0, ds.x_train, ds.y_train)
    both = Trainer(obj, cfg, trajectory=trajectory_buffer(TJ.log_schedule(cfg.steps, 10))).fit(
        problem.params0, ds.x_train, ds.y_train)
    np.testing.assert_array_equal(ravel_pytree(plain.params)[0], ravel_pytree(both.params)[0])
    for a, b in zip(jax.tree.leaves(plain.snapshots), jax.tree.leaves(both.snapshots), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(both.trajectory.steps, TJ.log_schedule(cfg.steps, 10))
