import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

from mini_unlearn_jax.app.data import synthetic
from mini_unlearn_jax.core import linalg as cv
from mini_unlearn_jax.core import methods as M
from mini_unlearn_jax.core import mini as ul
from mini_unlearn_jax.core import mini_curvature
from mini_unlearn_jax.core import registry as R
from mini_unlearn_jax.core.models import Objective, build_model, init_params, make_objective
from mini_unlearn_jax.core.snapshots import snapshot_buffer
from mini_unlearn_jax.core.training import TrainConfig, Trainer, default_config
from mini_unlearn_jax.evaluation.metrics import mean_kl, predict_probs, rel_param_error

# -- a strongly convex quadratic: ridge regression with an unpenalized bias ---------------


def _ridge():
    rng = np.random.default_rng(0)
    n, d = 120, 4
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=d) + 0.3 * rng.normal(size=n)).astype(np.float32)
    model = nn.Dense(1)
    obj = Objective(apply_fn=lambda p, xb: model.apply({"params": p}, xb),
                    example_loss=lambda z, t: 0.5 * (z[0] - t) ** 2, l2=0.5, convex=True)
    params0 = model.init(jax.random.key(0), x[:1])["params"]
    return obj, params0, x, y


def _ridge_solution(x, y, keep, l2):
    """Closed-form minimizer of mean 0.5 (x w + b - y)^2 + l2/2 ||w||^2 (independent oracle)."""
    xs, ys = x[keep].astype(np.float64), y[keep].astype(np.float64)
    m = xs.shape[0]
    X1 = np.concatenate([xs, np.ones((m, 1))], 1)
    reg = np.diag([l2] * xs.shape[1] + [0.0])
    sol = np.linalg.solve(X1.T @ X1 / m + reg, X1.T @ ys / m)
    return sol


def test_fixed_point_converges_to_retrained_minimizer_and_error_estimate_holds():
    obj, params0, x, y = _ridge()
    cfg = TrainConfig(optimizer="lbfgs", steps=300, tol=1e-6, snapshots=4)
    state = Trainer(obj, cfg).fit(params0, x, y)
    forget = np.arange(0, 120, 3)  # 33% removal
    keep = np.ones(120, bool)
    keep[forget] = False
    w_r = _ridge_solution(x, y, keep, obj.l2)
    # stopped by the step cap mid-way: not converged, and the input parameters come back bit for bit
    res = ul.fixed_point_unlearn(obj, state.params, state.snapshots, x, y, forget,
                     config=ul.MiniConfig(curvature="exact", refine_passes=0, tol=1e-7, max_iter=8), throw=False)
    assert not bool(res.converged) and int(res.status) == ul.MAX_ITER
    for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    res = ul.fixed_point_unlearn(obj, state.params, state.snapshots, x, y, forget,
                     config=ul.MiniConfig(curvature="exact", refine_passes=0, tol=1e-7, max_iter=400))
    w = np.concatenate([np.asarray(res.params["kernel"])[:, 0], np.asarray(res.params["bias"])])
    err = np.linalg.norm(w - w_r)
    assert 0.0 < float(res.contraction) < 1.0
    # q/(1-q) * step is an estimate (q is estimated); on this linear contraction it holds
    assert err <= float(res.error_estimate) * 1.05 + 1e-5, (err, float(res.error_estimate))
    assert float(res.error_bound) == float(res.error_estimate)  # the old name still works
    assert bool(res.converged) and int(res.status) == ul.CONVERGED
    assert err < 1e-4


@pytest.fixture(scope="module")
def logreg():
    ds = synthetic(n=600, n_test=300, d=8, classes=3, seed=1, sep=1.0)
    model = build_model("logreg", 3)
    obj = make_objective(model, 1e-2)
    cfg = default_config("logreg", ds.n_train)
    p0 = init_params(model, ds.x_train[0], 0)
    st = Trainer(obj, cfg).fit(p0, ds.x_train, ds.y_train)
    stats = cv.fit_stats(obj, st.params, ds.x_train)
    problem = M.Problem(obj, cfg, p0, st.params, st.snapshots, stats, jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
    return ds, problem


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.1, 0.5])
def test_mini_is_close_to_retraining_at_high_ratios(logreg, ratio):
    ds, problem = logreg
    rng = np.random.default_rng(0)
    forget = rng.choice(ds.n_train, int(ratio * ds.n_train), replace=False)
    ret = R.run_method("retrain", problem, forget)
    p_ret = predict_probs(problem.objective, ret.params, ds.x_test)
    kl_orig = mean_kl(p_ret, predict_probs(problem.objective, problem.params, ds.x_test))
    for name, rel_max, kl_max in (("mini", 0.5, 0.1), ("mini-lite", 0.8, 1.0)):
        out = R.run_method(name, problem, forget)
        assert out.converged, out.reason
        chex.assert_tree_all_finite(out.params)
        rel = rel_param_error(out.params, ret.params, problem.params)
        kl = mean_kl(p_ret, predict_probs(problem.objective, out.params, ds.x_test))
        assert rel < rel_max, (name, rel)
        assert kl < kl_max * kl_orig, (name, kl, kl_orig)
        assert out.info["contraction"] < 1.0


def test_retrain_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    ds = synthetic(n=300, n_test=200, d=5, classes=3, seed=4, sep=1.0)
    l2 = 1e-2
    model = build_model("logreg", 3)
    obj = make_objective(model, l2)
    cfg = TrainConfig(optimizer="lbfgs", steps=500, tol=1e-7)
    forget = np.arange(0, 300, 4)
    keep = np.ones(300, bool)
    keep[forget] = False
    p0 = init_params(model, ds.x_train[0], 0)
    problem = M.Problem(obj, cfg, p0, p0, None, None, jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
    ret = R.run_method("retrain", problem, forget)
    sk = LogisticRegression(C=1.0 / (l2 * keep.sum()), tol=1e-10, max_iter=5000).fit(ds.x_train[keep], ds.y_train[keep])
    p_sk = sk.predict_proba(ds.x_test)
    p_ours = predict_probs(obj, ret.params, ds.x_test)
    assert mean_kl(p_sk, p_ours) < 1e-4


def test_divergence_is_reported_and_original_params_returned(logreg):
    ds, problem = logreg
    # a deliberately wrong quasi-Hessian: secant pairs with 1e-4 of the true curvature, so the
    # modelled remaining-data Hessian (n B - H_R)/(n - r) is indefinite at 50% removal
    snaps = problem.snapshots
    K = snaps.steps.shape[0]
    w_star = jax.tree.map(lambda a: a[(int(snaps.count) - 1) % K], snaps.params)
    g_star = jax.tree.map(lambda a: a[(int(snaps.count) - 1) % K], snaps.grads)
    buf = snapshot_buffer(K)
    bad = buf.init(problem.params)
    for k in range(K):
        shift = jax.tree.map(lambda p, k=k: p + 0.1 * (K - k), w_star)
        bad = buf.update(bad, k, shift, jax.tree.map(lambda g, s, w: g + 1e-4 * (s - w), g_star, shift, w_star))
    bad = buf.update(bad, K, w_star, g_star, force=True)
    forget = np.arange(0, ds.n_train, 2)
    res = ul.fixed_point_unlearn(problem.objective, problem.params, bad, problem.x, problem.y, forget,
                     config=ul.MiniConfig(curvature="lbfgs", refine_passes=2), throw=False)
    assert not bool(res.converged)
    # a clear expansion: steps growing by a rate estimate above 1 over several iterations
    assert int(res.status) == ul.EXPANDING and res.status_name() == "expanding"
    assert float(res.contraction) > 1.0 and float(res.error_estimate) == np.inf
    assert float(res.stats.step_norm) > ul.GROW_FACTOR * float(res.stats.min_step_norm)
    assert int(res.refine_passes) == 0  # a failed fixed point is not refined
    for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(problem.params), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "not contractive" in res.reason()


def test_nan_in_removed_examples_is_caught(logreg):
    ds, problem = logreg
    x = np.array(ds.x_train)
    x[5, 0] = np.nan
    res = ul.fixed_point_unlearn(problem.objective, problem.params, problem.snapshots, jnp.asarray(x), problem.y, [5, 6, 7],
                     stats=problem.stats, config=ul.MiniConfig(refine_passes=0), throw=False)
    assert not bool(res.converged)
    chex.assert_tree_all_finite(res.params)


@pytest.mark.slow
def test_no_recompilation_within_a_bucket_and_vmapped_requests_match(logreg):
    ds, problem = logreg
    cfg = ul.MiniConfig(refine_passes=2, min_bucket=128)
    args = (problem.objective, problem.params, problem.snapshots, problem.x, problem.y)
    ul.fixed_point_unlearn(*args, np.arange(70), stats=problem.stats, config=cfg)  # bucket 128
    before = ul.solve_jit._cache_size()
    r1 = ul.fixed_point_unlearn(*args, np.arange(100, 200), stats=problem.stats, config=cfg)  # 100 -> same bucket
    r2 = ul.fixed_point_unlearn(*args, np.arange(300, 427), stats=problem.stats, config=cfg)  # 127 -> same bucket
    assert ul.solve_jit._cache_size() == before
    many = ul.fixed_point_unlearn_many(*args, [np.arange(100, 200), np.arange(300, 427)], stats=problem.stats, config=cfg)
    for i, single in enumerate((r1, r2)):
        np.testing.assert_allclose(ravel_pytree(jax.tree.map(lambda a, i=i: a[i], many.params))[0],
                                   ravel_pytree(single.params)[0], rtol=1e-4, atol=1e-5)
    assert bool(np.all(many.converged))


@pytest.mark.parametrize("bad,msg", [
    ([], "empty"), ([1, 1, 2], "duplicates"), ([-1, 3], "lie in"), ([0, 600], "lie in"),
    ([0.5, 2.0], "integers"), (np.arange(600), "all 600"), ([[1, 2]], "1-D"),
])
def test_bad_forget_indices_are_rejected(bad, msg):
    with pytest.raises(ValueError, match=msg):
        ul.validate_indices(bad, 600)


def test_bucket_sizes():
    assert ul.bucket_size(1, 64) == 64 and ul.bucket_size(64, 64) == 64
    assert ul.bucket_size(65, 64) == 128 and ul.bucket_size(3000, 64) == 4096


def test_api_input_checks(logreg):
    ds, problem = logreg
    args = (problem.objective, problem.params, problem.snapshots)
    with pytest.raises(ValueError, match="same n"):
        ul.fixed_point_unlearn(*args, problem.x, problem.y[:-1], [1], stats=problem.stats)
    with pytest.raises(ValueError, match="features"):
        ul.fixed_point_unlearn(*args, problem.x[:, :4], problem.y, [1], stats=problem.stats)
    empty = snapshot_buffer(2).init(problem.params)
    with pytest.raises(ValueError, match="empty"):
        ul.fixed_point_unlearn(problem.objective, problem.params, empty, problem.x, problem.y, [1], stats=problem.stats)
    with pytest.raises(ValueError, match="needs a logistic-regression model"):
        ul.fixed_point_unlearn(*args, problem.x, problem.y, [1], stats=None, config=ul.MiniConfig(curvature="ekfac"))


def test_bitwise_determinism(logreg):
    ds, problem = logreg
    a = R.run_method("mini", problem, np.arange(0, 600, 7))
    b = R.run_method("mini", problem, np.arange(0, 600, 7))
    np.testing.assert_array_equal(ravel_pytree(a.params)[0], ravel_pytree(b.params)[0])
    r1 = R.run_method("retrain", problem, np.arange(0, 600, 7))
    r2 = R.run_method("retrain", problem, np.arange(0, 600, 7))
    np.testing.assert_array_equal(ravel_pytree(r1.params)[0], ravel_pytree(r2.params)[0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 499), min_size=1, max_size=200, unique=True), st.sampled_from([1, 16, 64]))
def test_padding_property(indices, min_bucket):
    idx, mask = ul.pad_request(indices, 500, min_bucket)
    size = idx.size
    assert size >= max(len(indices), min_bucket) and size & (size - 1) == 0  # a power of two
    assert size < 2 * max(len(indices), min_bucket)  # the smallest such
    assert mask.sum() == len(indices) and np.all(mask[: len(indices)] == 1)
    np.testing.assert_array_equal(idx[: len(indices)], np.sort(indices))
    assert np.all(idx[len(indices):] == 0) and np.all(mask[len(indices):] == 0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-5, 60), min_size=0, max_size=30))
def test_validate_indices_property(values):
    arr = np.array(values, np.int64)
    ok = arr.size > 0 and arr.min() >= 0 and arr.max() < 50 and np.unique(arr).size == arr.size and arr.size < 50
    if ok:
        np.testing.assert_array_equal(ul.validate_indices(arr, 50), np.sort(arr))
    else:
        with pytest.raises(ValueError):
            ul.validate_indices(arr, 50)


@pytest.mark.slow
def test_stream_of_requests_compiles_once_per_bucket(logreg):
    ds, problem = logreg
    cfg = ul.MiniConfig(refine_passes=1, min_bucket=64, chunk=32)  # a config no other test uses
    args = (problem.objective, problem.params, problem.snapshots, problem.x, problem.y)
    start = ul.solve_jit._cache_size()
    sizes = [5, 60, 70, 100, 130, 250, 3, 64, 128, 129, 300, 512, 17]
    rng = np.random.default_rng(0)
    buckets = set()
    for r in sizes:
        ul.fixed_point_unlearn(*args, rng.choice(600, r, replace=False), stats=problem.stats, config=cfg)
        buckets.add(ul.bucket_size(r, 64))
        assert ul.solve_jit._cache_size() - start == len(buckets)
    assert buckets == {64, 128, 256, 512}


@pytest.mark.slow
def test_removed_grad_sum_equals_sum_of_per_example_grads():
    """The chunked masked-sum gradient equals an explicit sum of vmapped per-example gradients
    over the unmasked rows (MLP, padding rows masked out)."""
    ds = synthetic(n=96, n_test=8, d=6, classes=3, seed=4)
    model = build_model("mlp", 3, hidden=16)
    obj = make_objective(model, 1e-3)
    params = init_params(model, ds.x_train[0], 1)
    idx, mask = ul.pad_request(np.array([3, 10, 11, 40, 77]), 96, min_bucket=8)
    xr, yr = jnp.asarray(ds.x_train[idx]), jnp.asarray(ds.y_train[idx])
    got = ul.removed_grad_sum(obj, params, xr, yr, jnp.asarray(mask), 4)
    per_ex = obj.example_grads(params, xr[:5], yr[:5])
    want = jax.tree.map(lambda g: g.sum(0), per_ex)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_batched_result_gives_per_request_reasons_and_views(logreg):
    ds, problem = logreg
    many = ul.fixed_point_unlearn_many(problem.objective, problem.params, problem.snapshots, problem.x, problem.y,
                           [np.arange(0, 20), np.arange(40, 90)], stats=problem.stats)
    assert many.reason() == ["converged", "converged"]
    one = many.request(1)
    assert one.reason() == "converged" and np.ndim(one.status) == 0
    single = ul.fixed_point_unlearn(problem.objective, problem.params, problem.snapshots, problem.x, problem.y,
                        np.arange(40, 90), stats=problem.stats)
    chex.assert_trees_all_close(one.params, single.params, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not a batch"):
        single.request(0)


def test_chunk_that_does_not_divide_the_buckets_is_refused_up_front():
    with pytest.raises(ValueError, match="powers of two"):
        ul.MiniConfig(chunk=100)
    ul.MiniConfig(chunk=128)


def _dense_newton_step(problem, forget):
    """The exact Newton step on F_{D\\R} from w* by a dense solve (independent oracle)."""
    obj, params, x, y = problem.objective, problem.params, problem.x, problem.y
    n = x.shape[0]
    keep = jnp.asarray(M.keep_mask(n, forget))
    w0, unravel = ravel_pytree(params)
    m_vec = ravel_pytree(jax.tree.map(lambda p, m: jnp.full(p.shape, float(m), p.dtype), params, obj.l2_mask(params)))[0]
    f = lambda w: obj.data_loss(unravel(w), x, y, keep) + 0.5 * obj.l2 * jnp.sum(m_vec * w * w)
    g = jax.grad(f)(w0)
    # stationary: subtract the full objective's own residual gradient at w* (zero at convergence)
    full = lambda w: obj.data_loss(unravel(w), x, y, jnp.ones(n)) + 0.5 * obj.l2 * jnp.sum(m_vec * w * w)
    g = g - jax.grad(full)(w0)
    H = np.asarray(jax.hessian(f)(w0), np.float64)
    step = np.linalg.lstsq(H, -np.asarray(g, np.float64), rcond=1e-10)[0]  # min-norm: the bias shift is flat
    return w0, step


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.1, 0.5])
def test_ekfac_refinement_reaches_the_dense_newton_step(logreg, ratio):
    ds, problem = logreg
    forget = np.sort(np.random.default_rng(1).choice(ds.n_train, int(ratio * ds.n_train), replace=False))
    w0, step = _dense_newton_step(problem, forget)
    # enough products for CG to converge on 27 parameters: the refined iterate is the Newton step
    cfg = ul.MiniConfig(refine_passes=40, precond_sample=0)
    res = ul.fixed_point_unlearn(problem.objective, problem.params, problem.snapshots, problem.x, problem.y, forget,
                     stats=problem.stats, config=cfg)
    assert res.curvature() == "ekfac" and float(res.refine_residual) < 1e-3
    got = ravel_pytree(problem.objective.canonicalize(res.params))[0]
    want = ravel_pytree(problem.objective.canonicalize(ravel_pytree(problem.params)[1](w0 + step)))[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * max(1.0, float(np.linalg.norm(step))))


@pytest.mark.slow
def test_subsampled_removed_curvature_estimate_and_solve(logreg):
    ds, problem = logreg
    n = ds.n_train
    forget = np.sort(np.random.default_rng(2).choice(n, 300, replace=False))
    idx, mask = ul.pad_request(forget, n, 64)  # bucket 512, 300 real rows
    stats, obj = problem.stats, problem.objective
    xr = problem.x[idx]
    probs_r = jax.nn.softmax(obj.apply_fn(problem.params, xr), -1)
    exact = cv.ekfac_removed_sum(stats, xr, probs_r, jnp.asarray(mask))
    # a sample covering every row is the exact sum; a smaller one is an estimate of it
    np.testing.assert_allclose(mini_curvature._removed_ekfac_sum(stats, xr, probs_r, jnp.asarray(mask), 0), exact, rtol=1e-6)
    np.testing.assert_allclose(mini_curvature._removed_ekfac_sum(stats, xr, probs_r, jnp.asarray(mask), 1024), exact, rtol=1e-6)
    est = mini_curvature._removed_ekfac_sum(stats, xr, probs_r, jnp.asarray(mask), 128)
    rel = float(jnp.linalg.norm(est - exact) / jnp.linalg.norm(exact))
    assert rel < 0.2, rel
    # the estimate shapes only the preconditioner: the refined solve still matches retraining
    ret = R.run_method("retrain", problem, forget)
    for sample in (0, 128):
        res = ul.fixed_point_unlearn(obj, problem.params, problem.snapshots, problem.x, problem.y, forget, stats=stats,
                         config=ul.MiniConfig(precond_sample=sample))
        assert rel_param_error(res.params, ret.params, problem.params) < 0.3
