import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from mini_unlearn_jax.app.data import synthetic
from mini_unlearn_jax.core import linalg as cv
from mini_unlearn_jax.core.models import build_model, init_params, make_objective


def _quadratic(d, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    eig = np.linspace(0.5, 5.0, d)
    H = (Q * eig) @ Q.T
    return jnp.asarray(H, jnp.float32), jnp.asarray(Q.T, jnp.float32)


def test_lbfgs_product_equals_exact_hvp_on_quadratic_with_conjugate_pairs():
    d = 6
    H, S = _quadratic(d)  # rows of S: eigenvectors, hence H-conjugate directions
    f = lambda w: 0.5 * w @ H @ w
    Y = jax.vmap(lambda s: cv.hvp(f, jnp.zeros(d), s))(S)  # secant pairs of the quadratic: y = H s
    valid = jnp.ones(d, bool)
    v = jax.random.normal(jax.random.key(1), (d,))
    Bv = cv.lbfgs_product(S, Y, v, valid)
    exact = cv.hvp(f, jnp.ones(d), v)  # jvp-based oracle
    np.testing.assert_allclose(Bv, exact, rtol=2e-4, atol=2e-4)


def test_lbfgs_product_secant_condition_and_invalid_rows_ignored():
    rng = np.random.default_rng(0)
    d, m = 10, 4
    A = rng.normal(size=(d, d))
    H = jnp.asarray(A @ A.T + np.eye(d), jnp.float32)
    S = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)
    Y = S @ H
    valid = jnp.ones(m, bool)
    np.testing.assert_allclose(cv.lbfgs_product(S, Y, S[-1], valid), Y[-1], rtol=1e-3, atol=1e-3)
    junk_S = jnp.concatenate([S, 100 * jnp.ones((2, d))])
    junk_Y = jnp.concatenate([Y, -jnp.ones((2, d))])
    valid2 = jnp.concatenate([valid, jnp.zeros(2, bool)])
    v = jnp.asarray(rng.normal(size=d), jnp.float32)
    np.testing.assert_allclose(cv.lbfgs_product(junk_S, junk_Y, v, valid2),
                               cv.lbfgs_product(S, Y, v, valid), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def logreg_problem():
    ds = synthetic(n=200, n_test=50, d=5, classes=3, seed=3)
    model = build_model("logreg", 3)
    obj = make_objective(model, 1e-2)
    params = jax.tree.map(lambda p: p + 0.3, init_params(model, ds.x_train[0], 0))
    return obj, params, jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)


def test_ggn_equals_hessian_for_logistic_regression(logreg_problem):
    obj, params, x, y = logreg_problem
    w = jnp.ones((x.shape[0],))
    v = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), params)
    ggn = cv.ggn_vp(obj, params, x, y, w, v)
    exact = cv.hvp(lambda p: obj.data_loss(p, x, y, w), params, v)
    np.testing.assert_allclose(ravel_pytree(ggn)[0], ravel_pytree(exact)[0], rtol=1e-4, atol=1e-6)


def _dense_data_hessian(obj, params, x, y, keep):
    w0, unravel = ravel_pytree(params)
    f = lambda w: obj.data_loss(unravel(w), x, y, keep)
    return jax.hessian(f)(w0), unravel


@pytest.mark.slow
def test_ekfac_diagonal_is_exact_in_kronecker_basis_and_removal_is_exact(logreg_problem):
    obj, params, x, y = logreg_problem
    probs = jax.nn.softmax(obj.apply_fn(params, x))
    stats = cv.ekfac_fit(x, probs)
    n = x.shape[0]
    Hd, unravel = _dense_data_hessian(obj, params, x, y, jnp.ones(n))
    # columns of the Kronecker basis, as flat parameter vectors
    d1, C = stats.diag.shape
    to_vec = lambda m: ravel_pytree(cv.logreg_params(m))[0]
    diag_exact = np.zeros((d1, C))
    for j in range(d1):
        for k in range(C):
            u = to_vec(jnp.outer(stats.UA[:, j], stats.UG[:, k]))
            diag_exact[j, k] = u @ Hd @ u
    np.testing.assert_allclose(stats.diag, diag_exact, rtol=1e-3, atol=1e-6)
    # removing examples: full stats minus the removed terms equals stats fitted on the rest
    rem = jnp.arange(0, n, 3)
    mask = jnp.ones(rem.shape[0])
    keep = np.ones(n, bool)
    keep[np.asarray(rem)] = False
    diag_rem = (n * stats.diag - cv.ekfac_removed_sum(stats, x[rem], probs[rem], mask)) / keep.sum()
    z2, q = cv._ekfac_terms(stats, cv.with_bias(x[keep]), probs[keep])
    np.testing.assert_allclose(diag_rem, z2.T @ q / keep.sum(), rtol=1e-3, atol=1e-6)
    assert float(jnp.min(diag_rem)) >= 0.0


def test_ekfac_solve_inverts_product(logreg_problem):
    obj, params, x, _ = logreg_problem
    stats = cv.ekfac_fit(x, jax.nn.softmax(obj.apply_fn(params, x)))
    m = jax.random.normal(jax.random.key(0), stats.diag.shape)
    back = cv.ekfac_solve(stats, stats.diag, 0.1, cv.ekfac_product(stats, stats.diag, m) + 0.1 * m)
    np.testing.assert_allclose(back, m, rtol=1e-3, atol=1e-4)


def test_pcg_solves_spd_system_and_stops():
    H, _ = _quadratic(8, seed=2)
    b = jnp.arange(8.0)
    x, rel, used = cv.pcg(lambda v: H @ v, b, jnp.zeros(8), lambda v: v, iters=50)
    np.testing.assert_allclose(H @ x, b, rtol=1e-4, atol=1e-4)
    assert float(rel) < 1e-5 and int(used) <= 50


def _counted(H):
    calls = []

    def A(v):
        jax.debug.callback(lambda: calls.append(1))
        return H @ v

    return A, calls


def test_pcg_makes_at_most_iters_products_the_start_residual_included():
    H, _ = _quadratic(8, seed=2)
    b = jnp.arange(8.0)
    A, calls = _counted(H)
    # from a nonzero start: one product for b - A x0, then iters - 1 CG steps
    x0 = jnp.ones(8)
    x, rel, used, rel0 = cv.pcg(A, b, x0, lambda v: v, iters=4, initial_residual=True)
    jax.effects_barrier()
    assert len(calls) == int(used) == 4
    np.testing.assert_allclose(float(rel0), float(jnp.linalg.norm(b - H @ x0) / jnp.linalg.norm(b)), rtol=1e-5)
    np.testing.assert_allclose(float(rel), float(jnp.linalg.norm(b - H @ x) / jnp.linalg.norm(b)), rtol=1e-3)
    # from zero the residual is b itself: all iters products are CG steps
    calls.clear()
    _, _, used = cv.pcg(A, b, jnp.zeros(8), lambda v: v, iters=4)
    jax.effects_barrier()
    assert len(calls) == int(used) == 4
    # it stops once converged: the exact preconditioner solves in one step
    calls.clear()
    Hinv = jnp.linalg.inv(H)
    x, rel, used = cv.pcg(A, b, jnp.zeros(8), lambda v: Hinv @ v, iters=10)
    jax.effects_barrier()
    assert len(calls) == int(used) <= 2 and float(rel) < 1e-4
    with pytest.raises(ValueError, match="iters >= 1"):
        cv.pcg(A, b, x0, lambda v: v, iters=0)


def test_frozen_softmax_loss_gives_the_cross_entropy_hessian_products(logreg_problem):
    obj, params, x, y = logreg_problem
    n = x.shape[0]
    keep = jnp.asarray((np.arange(n) % 4 != 0).astype(np.float32))
    probs = jax.nn.softmax(obj.apply_fn(params, x))
    frozen = dataclasses.replace(obj, example_loss=cv.frozen_softmax_loss)
    for i in range(3):
        v = cv.logreg_params(jax.random.normal(jax.random.key(i), cv.logreg_matrix(params).shape))
        got = cv.ggn_vp(frozen, params, x, probs, keep, v)
        exact = cv.hvp(lambda p: obj.data_loss(p, x, y, keep), params, v)  # independent oracle
        np.testing.assert_allclose(ravel_pytree(got)[0], ravel_pytree(exact)[0], rtol=1e-4, atol=1e-6)
    # its Hessian in the logits is diag(p) - p p^T whatever the logits
    z = jax.random.normal(jax.random.key(5), (3,))
    np.testing.assert_allclose(jax.hessian(cv.frozen_softmax_loss)(z, probs[0]),
                               jnp.diag(probs[0]) - jnp.outer(probs[0], probs[0]), rtol=1e-5, atol=1e-7)
