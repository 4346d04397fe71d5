"""The certificate ||w - w_R|| <= ||grad F_{D\\R}(w)|| / l2 against independent oracles.

w_R comes from outside the library: the normal equations of ridge regression solved in float64
numpy, and scikit-learn's LogisticRegression (lbfgs, float64) for the multinomial model, both
with the bias penalised (sklearn: ``fit_intercept=False`` and a column of ones, C = 1/(l2 m)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from mini_unlearn_jax.app.data import synthetic
from mini_unlearn_jax.core import certificate as C
from mini_unlearn_jax.core import linalg as cv
from mini_unlearn_jax.core import methods as M
from mini_unlearn_jax.core import registry as R
from mini_unlearn_jax.core.models import (
    LogisticRegression,
    all_params_mask,
    build_model,
    init_params,
    make_objective,
    squared_error,
)
from mini_unlearn_jax.core.training import TrainConfig, Trainer


def _flat64(params) -> np.ndarray:
    return np.asarray(ravel_pytree(params)[0], np.float64)


def _linear_params(kernel: np.ndarray, bias: np.ndarray):
    """Parameters of LogisticRegression (a Dense layer) from a [d, C] kernel and a [C] bias, in float32."""
    return {"Dense_0": {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}}


# -- ridge regression, closed form ------------------------------------------------------------


def test_bound_holds_for_ridge_against_the_normal_equations():
    rng = np.random.default_rng(0)
    n, d, lam = 500, 6, 0.05
    x = rng.normal(size=(n, d)).astype(np.float32) * np.linspace(0.3, 2.0, d).astype(np.float32)
    y = (x @ rng.normal(size=d) + 1.5 + 0.3 * rng.normal(size=n)).astype(np.float32)
    obj = make_objective(LogisticRegression(num_classes=1), lam, example_loss=squared_error, penalize_bias=True)
    forget = rng.choice(n, 150, replace=False)
    keep = M.keep_mask(n, forget)

    def ridge(k):  # argmin (1/m) sum_kept 0.5 (x w + b - y)^2 + lam/2 (|w|^2 + b^2), in float64
        xt = np.hstack([x, np.ones((n, 1))]).astype(np.float64)[k > 0]
        a = xt.T @ xt / xt.shape[0] + lam * np.eye(d + 1)
        return np.linalg.solve(a, xt.T @ y[k > 0].astype(np.float64) / xt.shape[0]), a

    w_star, _ = ridge(np.ones(n))
    w_r, a_rem = ridge(keep)
    eig = np.linalg.eigvalsh(a_rem)
    assert eig[0] >= lam  # the remaining-data objective is lam-strongly convex
    for w in (w_star, w_r + 1e-4 * rng.normal(size=d + 1), w_r + rng.normal(size=d + 1), np.zeros(d + 1)):
        params = _linear_params(w[:d, None], w[d:])
        w32 = np.concatenate([np.asarray(params["Dense_0"]["kernel"], np.float64)[:, 0],
                              np.asarray(params["Dense_0"]["bias"], np.float64)])  # [kernel, bias] like w_r
        err = np.linalg.norm(w32 - w_r)
        cert = C.certify(obj, params, x, y, keep, chunk=128)
        assert cert.is_bound and cert.dtype == "float64" and cert.mu == lam and cert.n_kept == n - 150
        # the pass is exact: for ridge grad F(w) = A (w - w_R)
        np.testing.assert_allclose(cert.grad_norm, np.linalg.norm(a_rem @ (w32 - w_r)), rtol=1e-8)
        assert err <= cert.bound
        assert cert.bound <= eig[-1] / lam * err * (1 + 1e-6) + 1e-9  # ||A e|| <= lambda_max ||e||
        assert cert.round_off < 1e-9 * max(cert.grad_norm, 1e-3)


# -- multinomial logistic regression, scikit-learn --------------------------------------------


@pytest.fixture(scope="module")
def logreg():
    ds = synthetic(n=600, n_test=100, d=5, classes=3, seed=3, sep=1.0)
    model = build_model("logreg", 3)
    lam = 1e-2
    obj = make_objective(model, lam, penalize_bias=True)
    cfg = TrainConfig(optimizer="lbfgs", steps=500, tol=1e-7)
    p0 = init_params(model, ds.x_train[0], 0)
    st = Trainer(obj, cfg).fit(p0, ds.x_train, ds.y_train)
    problem = M.Problem(obj, cfg, p0, st.params, st.snapshots, cv.fit_stats(obj, st.params, ds.x_train),
                        jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
    return ds, lam, problem


def _sklearn_optimum(x, y, lam):
    from sklearn.linear_model import LogisticRegression as SkLR

    xt = np.hstack([x.astype(np.float64), np.ones((x.shape[0], 1))])
    sk = SkLR(C=1.0 / (lam * x.shape[0]), fit_intercept=False, tol=1e-12, max_iter=10000).fit(xt, y)
    coef = sk.coef_  # [C, d + 1], the last column the (penalised) bias
    return coef[:, :-1].T, coef[:, -1]


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.1, 0.4])
def test_bound_holds_for_logistic_regression_against_sklearn(logreg, ratio):
    ds, lam, problem = logreg
    n = ds.x_train.shape[0]
    forget = np.sort(np.random.default_rng(int(ratio * 100)).choice(n, int(ratio * n), replace=False))
    keep = M.keep_mask(n, forget)
    kernel, bias = _sklearn_optimum(ds.x_train[keep > 0], ds.y_train[keep > 0], lam)
    w_r = np.concatenate([bias, kernel.ravel()])  # ravel_pytree order: Dense_0/bias, Dense_0/kernel
    # the oracle optimises our objective: its own certificate is tiny (and bounds its own error)
    oracle = C.certify(problem.objective, _linear_params(kernel, bias), ds.x_train, ds.y_train, keep)
    assert oracle.is_bound and oracle.bound < 1e-5
    slack = oracle.bound + np.linalg.norm(w_r - _flat64(_linear_params(kernel, bias)))  # sklearn's error + float32 cast

    mini = R.run_method("mini", problem, forget)
    assert mini.converged, mini.reason
    retrain = R.run_method("retrain", problem, forget)
    for name, params in (("original", problem.params), ("mini", mini.params), ("retrain", retrain.params)):
        err = np.linalg.norm(_flat64(params) - w_r)
        cert = C.certify(problem.objective, params, ds.x_train, ds.y_train, keep)
        assert cert.is_bound, cert.reason
        assert err <= cert.bound + slack, (name, err, cert.bound)
        if name != "retrain":  # retraining stops at a gradient norm near float32 resolution
            assert cert.bound <= 100 * err, (name, err, cert.bound)  # not vacuous
    assert np.linalg.norm(_flat64(mini.params) - w_r) < np.linalg.norm(_flat64(problem.params) - w_r)


# -- objectives that do not qualify -------------------------------------------------------------


@pytest.mark.slow
def test_objectives_that_are_not_strongly_convex_in_every_parameter_get_no_bound(logreg):
    ds, lam, problem = logreg
    n = ds.x_train.shape[0]
    keep = M.keep_mask(n, np.arange(0, n, 4))
    logreg_model = build_model("logreg", 3)
    smoothed = lambda z, t: optax.softmax_cross_entropy(z, optax.smooth_labels(jax.nn.one_hot(t, 3), 0.1))
    cases = {
        "bias free (the default)": make_objective(logreg_model, lam),
        "no l2": make_objective(logreg_model, 0.0, penalize_bias=True),
        "label smoothing": make_objective(logreg_model, lam, example_loss=smoothed, penalize_bias=True),
    }
    for what, obj in cases.items():
        cert = C.certify(obj, problem.params, ds.x_train, ds.y_train, keep)
        assert not cert.is_bound and cert.bound is None and cert.round_off == 0.0, what
        assert cert.reason and np.isfinite(cert.grad_norm), what
        assert (cert.estimate is None) == (obj.l2 == 0), what
    mlp = build_model("mlp", 3, hidden=8)
    obj = make_objective(mlp, lam, penalize_bias=True)
    p = init_params(mlp, ds.x_train[0], 0)
    cert = C.certify(obj, p, ds.x_train, ds.y_train, keep)
    assert not cert.is_bound and "linear" in cert.reason
    # the qualifying objective of the same model does get a bound
    assert C.certify(problem.objective, problem.params, ds.x_train, ds.y_train, keep).is_bound


@pytest.mark.slow
def test_penalize_bias_option_and_certificate_inputs(logreg):
    ds, lam, problem = logreg
    model = build_model("logreg", 3)
    p = problem.params
    default, full = make_objective(model, lam), make_objective(model, lam, penalize_bias=True)
    b = p["Dense_0"]["bias"]
    np.testing.assert_allclose(float(full.penalty(p)) - float(default.penalty(p)), 0.5 * lam * float(jnp.sum(b * b)), rtol=1e-5)
    assert default.canonicalize is not None and full.canonicalize is None and full.l2_mask is all_params_mask
    with pytest.raises(ValueError, match="either"):
        make_objective(model, lam, penalize_bias=True, l2_mask=all_params_mask)
    n = ds.x_train.shape[0]
    with pytest.raises(ValueError, match="0/1"):
        C.certify(full, p, ds.x_train, ds.y_train, np.full(n, 0.5))
    with pytest.raises(ValueError, match="every example"):
        C.certify(full, p, ds.x_train, ds.y_train, np.zeros(n))
    # float64 by default without turning x64 on for the caller; the native pass agrees
    forget = np.arange(10)
    c64 = C.certify_removal(full, p, ds.x_train, ds.y_train, forget, chunk=100)
    c32 = C.certify_removal(full, p, ds.x_train, ds.y_train, forget, precision="native")
    assert jnp.ones(1).dtype == jnp.float32
    assert c64.dtype == "float64" and c32.dtype == "float32"
    assert c32.bound >= c64.bound * (1 - 1e-6) and c32.round_off > c64.round_off
    np.testing.assert_allclose(c32.grad_norm, c64.grad_norm, rtol=1e-3)
