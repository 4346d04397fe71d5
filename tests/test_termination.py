"""Termination rules, the result record and the input checks of ``mini.unlearn`` (issue 11).

Computed values are compared with independent oracles (closed-form ridge regression, the
retrained model, the eigenvalues of the exact remaining-data Hessian); copied values (the input
parameters a failed request returns) with exact equality.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from mini_unlearn_jax.app.data import synthetic
from mini_unlearn_jax.core import linalg as cv
from mini_unlearn_jax.core import methods as M
from mini_unlearn_jax.core import mini as ul
from mini_unlearn_jax.core import registry as R
from mini_unlearn_jax.core.models import (
    Objective,
    build_model,
    cross_entropy,
    init_params,
    make_objective,
)
from mini_unlearn_jax.core.training import TrainConfig, Trainer, default_config
from mini_unlearn_jax.evaluation.metrics import rel_param_error

flat = lambda t: np.asarray(ravel_pytree(t)[0])


def _assert_bitwise_equal(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(u).dtype == np.asarray(v).dtype
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _logreg_problem(dtype=np.float32):
    """Synthetic 3-class logistic regression trained to convergence (call under x64 for float64)."""
    ds = synthetic(n=600, n_test=300, d=8, classes=3, seed=1, sep=1.0)
    x = ds.x_train.astype(dtype)
    model = build_model("logreg", 3)
    obj = make_objective(model, 1e-2)
    cfg = default_config("logreg", ds.n_train)
    p0 = jax.tree.map(lambda a: a.astype(dtype), init_params(model, x[0], 0))
    st = Trainer(obj, cfg).fit(p0, x, ds.y_train)
    stats = cv.fit_stats(obj, st.params, x)
    return ds, M.Problem(obj, cfg, p0, st.params, st.snapshots, stats, jnp.asarray(x), jnp.asarray(ds.y_train))


@pytest.fixture(scope="module")
def logreg():
    return _logreg_problem()


def _args(pb):
    return pb.objective, pb.params, pb.snapshots, pb.x, pb.y


def _ridge(scales=(1.0, 1.0, 1.0, 1.0), dtype=np.float32, l2=0.5):
    """Ridge regression with an unpenalized bias, trained to convergence, 1/3 of it removed."""
    rng = np.random.default_rng(0)
    n, d = 120, len(scales)
    x = (rng.normal(size=(n, d)) * np.asarray(scales)).astype(dtype)
    y = (x @ rng.normal(size=d) + 0.3 * rng.normal(size=n)).astype(dtype)
    model = nn.Dense(1, param_dtype=dtype)
    obj = Objective(apply_fn=lambda p, xb: model.apply({"params": p}, xb),
                    example_loss=lambda z, t: 0.5 * (z[0] - t) ** 2, l2=l2)
    st = Trainer(obj, TrainConfig(optimizer="lbfgs", steps=300, tol=1e-6 if dtype == np.float32 else 1e-12,
                                  snapshots=4)).fit(model.init(jax.random.key(0), x[:1])["params"], x, y)
    forget = np.arange(0, n, 3)
    keep = np.ones(n, bool)
    keep[forget] = False
    # the oracle: closed-form minimizer of the remaining-data objective, and its exact Hessian
    X1 = np.concatenate([x, np.ones((n, 1))], 1).astype(np.float64)
    reg = np.diag([l2] * d + [0.0])
    H_rem = X1[keep].T @ X1[keep] / keep.sum() + reg
    w_r = np.linalg.solve(H_rem, X1[keep].T @ y[keep].astype(np.float64) / keep.sum())
    H_full = X1.T @ X1 / n
    return obj, st, x, y, forget, w_r, H_rem, H_full


def _ridge_vec(params):
    return np.concatenate([np.asarray(params["kernel"])[:, 0], np.asarray(params["bias"])]).astype(np.float64)


# -- rate, estimate and the termination rules ---------------------------------------------------


def test_first_step_exit_reports_no_rate_and_no_estimate(logreg):
    ds, pb = logreg
    forget = np.arange(0, 600, 5)
    # a tolerance so loose that the first step ends the solve
    res = ul.fixed_point_unlearn(*_args(pb), forget, stats=pb.stats, config=ul.MiniConfig(tol=10.0, refine_passes=0))
    assert int(res.iterations) == 1 and int(res.status) == ul.CONVERGED and bool(res.converged)
    # one step gives no ratio: neither a rate nor an error estimate is claimed (never 0 and 0)
    assert np.isnan(float(res.contraction)) and np.isnan(float(res.error_estimate))
    assert np.isnan(float(res.stats.rate)) and int(res.stats.rate_ratios) == 0
    # the one step (an EKFAC Newton step) still moves towards the retrained model
    ret = R.run_method("retrain", pb, forget)
    assert rel_param_error(res.params, ret.params, pb.params) < 1.0


def test_slow_contraction_converges_with_the_rate_of_the_exact_map():
    obj, st, x, y, forget, w_r, H_rem, H_full = _ridge(scales=(4.0, 1.0, 1.0, 1.0))
    # curvature='exact' iterates w - (H_rem-gradient)/L with L = (n/(n-r)) lmax(H_D) + l2: a linear
    # map whose factor is 1 - lmin(H_rem)/L (the oracle, from the eigenvalues)
    n, nr = len(y), len(y) - len(forget)
    L = n / nr * np.linalg.eigvalsh(H_full).max() + obj.l2
    q_true = 1.0 - np.linalg.eigvalsh(H_rem).min() / L
    assert q_true > 0.95  # slow
    res = ul.fixed_point_unlearn(obj, st.params, st.snapshots, x, y, forget,
                     config=ul.MiniConfig(curvature="exact", refine_passes=0, tol=1e-5, max_iter=3000))
    assert int(res.status) == ul.CONVERGED and int(res.iterations) > 100
    q = float(res.contraction)
    assert 0.93 < q <= q_true + 1e-3, (q, q_true)  # ratios approach the factor from below
    err = np.linalg.norm(_ridge_vec(res.params) - w_r)
    # q/(1-q) * step is an estimate of the distance to the fixed point (here the retrained
    # minimizer): close to the true error, but not a bound
    assert abs(float(res.error_estimate) - err) <= 0.1 * err, (float(res.error_estimate), err)
    assert err < 1e-3


@pytest.mark.slow
def test_round_off_stall_in_float64_is_success_not_divergence(monkeypatch):
    with jax.enable_x64(True):
        ds, pb = _logreg_problem(np.float64)
        forget = np.arange(0, 600, 10)
        reachable = ul.fixed_point_unlearn(*_args(pb), forget, stats=pb.stats, config=ul.MiniConfig(tol=1e-12, refine_passes=0))
        tiny = ul.fixed_point_unlearn(*_args(pb), forget, stats=pb.stats,
                          config=ul.MiniConfig(tol=1e-30, refine_passes=0, max_iter=2000))
        assert int(tiny.status) == ul.AT_RESOLUTION and bool(tiny.converged), tiny.reason()
        assert "resolution" in tiny.reason()
        w = flat(tiny.params)
        assert w.dtype == np.float64
        assert float(tiny.stats.min_step_norm) <= ul.RESOLUTION * np.finfo(np.float64).eps * np.linalg.norm(w)
        np.testing.assert_allclose(w, flat(reachable.params), rtol=0, atol=1e-10 * np.linalg.norm(w))
        # the same iteration without the resolution rule stalls on round-off and is (wrongly)
        # declared non-contractive: the stall is real
        monkeypatch.setattr(ul, "RESOLUTION", 0.0)
        bare = ul.fixed_point_unlearn(*_args(pb), forget, stats=pb.stats, throw=False,
                          config=ul.MiniConfig(tol=1e-30, refine_passes=0, max_iter=2001))  # a fresh trace
        assert int(bare.status) in (ul.EXPANDING, ul.NOT_CONTRACTING), bare.status_name()


def test_step_cap_is_judged_on_the_rate_over_several_steps():
    obj, st, x, y, forget, w_r, _, _ = _ridge(scales=(4.0, 1.0, 1.0, 1.0))
    cfg = ul.MiniConfig(curvature="exact", refine_passes=0, tol=1e-5, max_iter=20)
    res = ul.fixed_point_unlearn(obj, st.params, st.snapshots, x, y, forget, config=cfg, throw=False)
    assert int(res.status) == ul.MAX_ITER and not bool(res.converged)
    assert int(res.stats.rate_ratios) == ul.RATE_WINDOW and float(res.contraction) < 1.0
    assert "still shrinking" in res.reason()
    _assert_bitwise_equal(res.params, st.params)
    # too few steps to estimate a rate: the cap says so, and no rate is reported
    res = ul.fixed_point_unlearn(obj, st.params, st.snapshots, x, y, forget, throw=False,
                     config=ul.MiniConfig(curvature="exact", refine_passes=0, tol=1e-5, max_iter=2))
    assert int(res.status) == ul.MAX_ITER and np.isnan(float(res.contraction))


# -- the refinement is judged -----------------------------------------------------------------


def _faked_refinement(pb, monkeypatch, shift: float, residual: float, passes: int):
    """``(lite, res)``: the fixed point alone, and ``mini`` whose CG result is moved by ``shift`` and
    reported with relative residual ``residual``. ``passes`` must be a refinement length no other
    test compiles, so jit's cache cannot hand back a program traced with another pcg."""
    forget = np.arange(0, 600, 4)
    lite = ul.fixed_point_unlearn(*_args(pb), forget, stats=pb.stats, config=ul.MiniConfig(refine_passes=0, tol=1.1e-5))
    real = cv.pcg

    def faked(A, b, x0, precond, iters, rtol=1e-6, *, initial_residual=False):
        d, _, used, rel0 = real(A, b, x0, precond, iters, rtol, initial_residual=True)
        return d + shift, jnp.asarray(residual, b.dtype), used, rel0

    monkeypatch.setattr(cv, "pcg", faked)
    res = ul.fixed_point_unlearn(*_args(pb), forget, stats=pb.stats, config=ul.MiniConfig(refine_passes=passes, tol=1.1e-5))
    return lite, res


def test_refinement_that_does_not_reduce_the_residual_falls_back_to_the_fixed_point(logreg, monkeypatch):
    lite, res = _faked_refinement(logreg[1], monkeypatch, 1e3, 5.0, 3)  # 5x worse than not moving
    assert int(res.status) == ul.REFINE_NO_PROGRESS and bool(res.converged)
    assert "fixed-point iterate is returned" in res.reason()
    assert float(res.refine_residual) >= 1.0 > float(res.stats.fixed_point_residual)
    np.testing.assert_allclose(flat(res.params), flat(lite.params), rtol=1e-6, atol=1e-7)


def test_refinement_whose_step_raises_the_objective_falls_back_to_the_fixed_point(logreg, monkeypatch):
    # the linear model's residual claims progress (0.5 < 1) while the step wrecks the model, as on a
    # non-convex MLP: the true remaining-data objective catches it
    lite, res = _faked_refinement(logreg[1], monkeypatch, 3.0, 0.5, 4)
    assert int(res.status) == ul.REFINE_ROSE and bool(res.converged) and res.status_name() == "refine_rose"
    assert "raised the remaining-data objective" in res.reason()
    np.testing.assert_allclose(flat(res.params), flat(lite.params), rtol=1e-6, atol=1e-7)


def test_an_accepted_refinement_lowers_the_remaining_objective(logreg):
    ds, pb = logreg
    forget = np.arange(0, 600, 4)
    keep = jnp.asarray(np.isin(np.arange(len(ds.x_train)), forget, invert=True).astype(np.float32))
    f = lambda p: float(pb.objective.value(p, jnp.asarray(ds.x_train), jnp.asarray(ds.y_train), keep))
    lite = ul.fixed_point_unlearn(*_args(pb), forget, stats=pb.stats, config=ul.MiniConfig(refine_passes=0, tol=1.1e-5))
    res = ul.fixed_point_unlearn(*_args(pb), forget, stats=pb.stats, config=ul.MiniConfig(refine_passes=5, tol=1.1e-5))
    assert int(res.status) == ul.CONVERGED and f(res.params) < f(lite.params)


def test_refinement_with_a_wrong_sign_operator_returns_the_input(logreg, monkeypatch):
    ds, pb = logreg
    real = cv.ggn_vp
    monkeypatch.setattr(cv, "ggn_vp", lambda *a: jax.tree.map(jnp.negative, real(*a)))
    res = ul.fixed_point_unlearn(*_args(pb), np.arange(0, 600, 4), stats=pb.stats, throw=False,
                     config=ul.MiniConfig(refine_passes=3, tol=1.2e-5))  # a fresh trace
    # against the (wrong) operator, neither the fixed point nor the refinement beats not moving
    assert int(res.status) == ul.REFINE_FAILED and not bool(res.converged)
    assert float(res.stats.fixed_point_residual) >= 1.0 and float(res.refine_residual) >= 1.0
    assert "worse than not moving" in res.reason()
    _assert_bitwise_equal(res.params, pb.params)


@pytest.mark.slow
def test_refinement_makes_exactly_refine_passes_data_passes(logreg, monkeypatch):
    ds, pb = logreg
    calls = []
    real = cv.ggn_vp

    def counted(*a):
        jax.debug.callback(lambda: calls.append(1))
        return real(*a)

    monkeypatch.setattr(cv, "ggn_vp", counted)
    for k in (1, 3):
        calls.clear()
        res = ul.fixed_point_unlearn(*_args(pb), np.arange(0, 600, 6), stats=pb.stats, config=ul.MiniConfig(refine_passes=k, tol=1.3e-5))
        jax.effects_barrier()
        assert len(calls) == k == int(res.refine_passes) == int(res.stats.data_passes)
        assert res.curvature() == "ekfac" and int(res.stats.curvature) == ul.CURVATURES.index("ekfac")
    # curvature='exact' also passes over the data: 31 for the power iteration, one per iteration
    obj, st, x, y, forget, w_r, _, _ = _ridge()
    calls.clear()
    res = ul.fixed_point_unlearn(obj, st.params, st.snapshots, x, y, forget, config=ul.MiniConfig(curvature="exact", refine_passes=2))
    jax.effects_barrier()
    assert len(calls) == int(res.stats.data_passes) == 31 + int(res.iterations) + int(res.refine_passes)
    assert 1 <= int(res.refine_passes) <= 2
    assert res.curvature() == "exact"
    assert np.linalg.norm(_ridge_vec(res.params) - w_r) < 1e-4


# -- result record, throw, batches ------------------------------------------------------------


def test_throw_raises_with_the_message_and_carries_the_result(logreg):
    ds, pb = logreg
    x = np.array(ds.x_train)
    x[5, 0] = np.nan
    args = (pb.objective, pb.params, pb.snapshots, jnp.asarray(x), pb.y)
    with pytest.raises(ul.UnlearnError, match="NaN/inf") as info:
        ul.fixed_point_unlearn(*args, [5, 6, 7], stats=pb.stats, config=ul.MiniConfig(refine_passes=0))
    res = info.value.result
    assert int(res.status) == ul.NONFINITE and res.status_name() == "nonfinite"
    _assert_bitwise_equal(res.params, pb.params)
    # throw=False returns the same result
    res2 = ul.fixed_point_unlearn(*args, [5, 6, 7], stats=pb.stats, config=ul.MiniConfig(refine_passes=0), throw=False)
    assert res2.reason() == res.reason() and res2.value is res2.params and int(res2.result) == ul.NONFINITE


def test_vmapped_batch_with_one_failing_request(logreg):
    ds, pb = logreg
    x = np.array(ds.x_train)
    x[5, 0] = np.nan  # only request 1 removes example 5
    args = (pb.objective, pb.params, pb.snapshots, jnp.asarray(x), pb.y)
    cfg = ul.MiniConfig(refine_passes=0)  # the fixed point reads only the removed rows
    reqs = [np.arange(100, 160), np.array([5, 6, 7]), np.arange(300, 340)]
    many = ul.fixed_point_unlearn_many(*args, reqs, stats=pb.stats, config=cfg)
    assert np.asarray(many.status).shape == (3,)
    assert list(np.asarray(many.converged)) == [True, False, True]
    assert many.status_name() == ["converged", "nonfinite", "converged"] and "NaN" in many.reason()[1]
    _assert_bitwise_equal(many.request(1).params, pb.params)
    for i in (0, 2):
        single = ul.fixed_point_unlearn(*args, reqs[i], stats=pb.stats, config=cfg)
        np.testing.assert_allclose(flat(many.request(i).params), flat(single.params), rtol=1e-5, atol=1e-6)
    assert many.curvature() == ["ekfac"] * 3
    with pytest.raises(ul.UnlearnError, match="1 of 3 unlearning requests failed: request 1"):
        ul.fixed_point_unlearn_many(*args, reqs, stats=pb.stats, config=cfg, throw=True)


@pytest.mark.slow
def test_the_number_of_requests_is_bucketed(logreg):
    ds, pb = logreg
    cfg = ul.MiniConfig(refine_passes=1, min_bucket=32)  # a config no other test uses
    reqs = [np.arange(i * 20, i * 20 + 10) for i in range(5)]
    start = ul._solve_many_jit._cache_size()
    three = ul.fixed_point_unlearn_many(*_args(pb), reqs[:3], stats=pb.stats, config=cfg)
    four = ul.fixed_point_unlearn_many(*_args(pb), reqs[:4], stats=pb.stats, config=cfg)
    assert ul._solve_many_jit._cache_size() - start == 1  # 3 and 4 requests share one program
    ul.fixed_point_unlearn_many(*_args(pb), reqs, stats=pb.stats, config=cfg)
    assert ul._solve_many_jit._cache_size() - start == 2  # 5 requests: the next bucket (8)
    assert np.asarray(three.converged).shape == (3,) and bool(np.all(four.converged))
    np.testing.assert_allclose(flat(three.request(2).params), flat(four.request(2).params), rtol=1e-6, atol=1e-7)


# -- input checks ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_stale_buffer_is_refused(logreg):
    ds, pb = logreg
    forget = np.arange(0, 600, 10)
    res = ul.fixed_point_unlearn(*_args(pb), forget, stats=pb.stats)
    # the unlearned parameters with the buffer recorded for the original ones
    with pytest.raises(ValueError, match="stale.*after_removal"):
        ul.fixed_point_unlearn(pb.objective, res.params, pb.snapshots, pb.x, pb.y, [1, 2], stats=pb.stats)
    # refreshed for them (one pass over the remaining data), the next request is accepted
    nxt = M.after_removal(pb, res.params, forget)
    out = ul.fixed_point_unlearn(nxt.objective, nxt.params, nxt.snapshots, nxt.x, nxt.y, [1, 2], stats=nxt.stats)
    assert bool(out.converged)
    # a perturbation of a few ulps is not stale
    ulps = jax.tree.map(lambda p: jnp.nextafter(p, jnp.inf), pb.params)
    ul._check_inputs(ulps, pb.snapshots, pb.x, pb.y, pb.stats)


def test_ekfac_is_refused_for_a_loss_other_than_softmax_cross_entropy(logreg):
    ds, pb = logreg
    model = build_model("logreg", 3)
    smooth = lambda z, t: optax.softmax_cross_entropy(z, optax.smooth_labels(jax.nn.one_hot(t, 3), 0.1))
    obj = make_objective(model, 1e-2, example_loss=smooth)
    assert obj.kind == "logreg"
    with pytest.raises(ValueError, match="plain softmax cross-entropy"):
        ul.fixed_point_unlearn(obj, pb.params, pb.snapshots, pb.x, pb.y, [1, 2], stats=pb.stats,
                   config=ul.MiniConfig(curvature="ekfac"))
    assert ul.resolve_curvature(obj, ul.MiniConfig(), pb.stats) == "lbfgs"  # auto picks a path that fits
    # the same loss written another way is recognised
    same = make_objective(model, 1e-2, example_loss=lambda z, t: cross_entropy(z, t))
    assert ul.resolve_curvature(same, ul.MiniConfig(), pb.stats) == "ekfac"


@pytest.mark.slow
def test_float64_end_to_end_under_x64(logreg):
    _, pb32 = logreg
    forget = np.arange(0, 600, 4)
    res32 = ul.fixed_point_unlearn(*_args(pb32), forget, stats=pb32.stats)
    with jax.enable_x64(True):
        # ridge in float64: the exact path with refinement reaches the closed-form minimizer
        obj, st, x, y, rm, w_r, _, _ = _ridge(dtype=np.float64)
        res = ul.fixed_point_unlearn(obj, st.params, st.snapshots, x, y, rm,
                         config=ul.MiniConfig(curvature="exact", refine_passes=3, tol=1e-12, max_iter=1000))
        assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(res.params))
        np.testing.assert_allclose(_ridge_vec(res.params), w_r, rtol=0, atol=1e-9)
        # logistic regression trained in float64: the default solve, against retraining
        _, pb = _logreg_problem(np.float64)
        res = ul.fixed_point_unlearn(*_args(pb), forget, stats=pb.stats)
        assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(res.params)) and bool(res.converged)
        ret = R.run_method("retrain", pb, forget)
        rel64 = rel_param_error(res.params, ret.params, pb.params)
        as64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)
        rel32 = rel_param_error(as64(res32.params), ret.params, pb.params)
    assert rel64 < 0.5 and abs(rel32 - rel64) < 1e-3, (rel32, rel64)


@pytest.mark.slow
def test_float32_parameters_stay_float32_under_x64(logreg):
    ds, pb = logreg
    forget = np.arange(0, 600, 4)
    ref = ul.fixed_point_unlearn(*_args(pb), forget, stats=pb.stats)
    with jax.enable_x64(True):
        x64 = np.asarray(ds.x_train, np.float64)
        stats64 = cv.fit_stats(pb.objective, pb.params, x64)  # float64 statistics under x64
        assert stats64.diag.dtype == jnp.float64
        res = ul.fixed_point_unlearn(pb.objective, pb.params, pb.snapshots, x64, pb.y, forget, stats=stats64)
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(res.params)) and bool(res.converged)
        many = ul.fixed_point_unlearn_many(pb.objective, pb.params, pb.snapshots, x64, pb.y, [forget, forget[:9]], stats=stats64)
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(many.params))
    np.testing.assert_allclose(flat(res.params), flat(ref.params), rtol=1e-4, atol=1e-5)


def test_default_refinement_passes_depend_on_the_curvature_path():
    from mini_unlearn_jax.core.mini import DEFAULT_REFINE_PASSES

    assert ul.MiniConfig().refine_passes is None
    assert DEFAULT_REFINE_PASSES["ekfac"] > DEFAULT_REFINE_PASSES["lbfgs"] == DEFAULT_REFINE_PASSES["exact"]
    with pytest.raises(ValueError):
        ul.MiniConfig(refine_passes=-1)


def test_bfloat16_parameters_are_refused_with_a_clear_message():
    ds = synthetic(n=120, n_test=20, d=4, classes=3, seed=0)
    model = build_model("logreg", 3)
    obj = make_objective(model, 1e-2)
    st = Trainer(obj, default_config("logreg", ds.n_train)).fit(init_params(model, ds.x_train[0], 0), ds.x_train,
                                                                 ds.y_train)
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), st.params)
    with pytest.raises(ValueError, match="bfloat16.*float32 or float64"):
        ul.fixed_point_unlearn(obj, p16, st.snapshots, ds.x_train, ds.y_train, [1, 2, 3])
    p64 = init_params(model, ds.x_train[0], 0, dtype=jnp.bfloat16)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(p64))


def test_lbfgs_training_of_float32_parameters_on_float64_data_under_x64():
    """The model computes in its parameters' dtype: float64 data under x64 no longer breaks
    optax's L-BFGS line search (its branches disagreed on dtypes)."""
    ds = synthetic(n=200, n_test=20, d=5, classes=3, seed=0)
    model = build_model("logreg", 3)
    obj = make_objective(model, 1e-2)
    with jax.enable_x64(True):
        st = Trainer(obj, default_config("logreg", 200)).fit(init_params(model, ds.x_train[0], 0),
                                                             np.asarray(ds.x_train, np.float64), ds.y_train)
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(st.params))
        assert float(st.grad_norm) < 1e-4
