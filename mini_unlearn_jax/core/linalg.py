"""Curvature models used by the unlearning solvers.

- :func:`hvp`, :func:`ggn_vp`: exact Hessian- and Gauss-Newton-vector products (``jax.jvp``);
  :func:`frozen_softmax_loss`: the cross-entropy's Gauss-Newton model at fixed probabilities
  (products from probabilities computed once).
- :func:`lbfgs_product`: the compact L-BFGS quasi-Hessian ``B v`` of Byrd, Nocedal and
  Schnabel (1994) from secant pairs ``(s_j, y_j)``, as DeltaGrad uses.
- :class:`EKFAC`: an eigenvalue-corrected Kronecker model of the multinomial logistic-regression
  Hessian ``H = (1/n) sum_i S_i (x) x_i x_i^T`` (``S_i = diag(p_i) - p_i p_i^T``, ``x_i`` with a bias
  1 appended). It keeps the Kronecker eigenbasis ``U_A (x) U_G`` of K-FAC and the *exact*
  diagonal of ``H`` in that basis, a sum of non-negative per-example terms. Removing examples
  subtracts their exact terms, so the remaining-data model stays positive semi-definite at any
  removal ratio (approximate and exact curvature are never subtracted from each other).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .models import check_param_dtypes

Params = Any


def hvp(fn, params: Params, v: Params) -> Params:
    """Exact Hessian-vector product of scalar ``fn`` at ``params`` by forward-over-reverse."""
    return jax.jvp(jax.grad(fn), (params,), (v,))[1]


def ggn_vp(objective, params: Params, x, y, weights, v: Params) -> Params:
    """Gauss-Newton-vector product of the weighted mean data loss: ``J^T H_logits J v``.

    Equals the Hessian for models linear in their parameters (logistic regression) and is
    positive semi-definite for any convex per-example loss.
    """
    logits, jv = jax.jvp(lambda p: objective.apply_fn(p, x), (params,), (v,))
    h_out = jax.vmap(lambda z, t, u: hvp(lambda zz: objective.example_loss(zz, t), z, u))(logits, y, jv)
    scale = weights / jnp.maximum(jnp.sum(weights), 1.0)
    _, vjp = jax.vjp(lambda p: objective.apply_fn(p, x), params)
    return vjp(h_out * scale[:, None])[0]


# -- compact L-BFGS -------------------------------------------------------------------------


def lbfgs_product(S: jax.Array, Y: jax.Array, v: jax.Array, valid: jax.Array | None = None, *,
                  scale: str = "yy/sy", min_scale: float = 0.0) -> jax.Array:
    """``B v`` for the compact L-BFGS quasi-Hessian of the pairs ``(S[i], Y[i])``, oldest first.

    ``B = sigma I - [Y, sigma S] M^{-1} [Y, sigma S]^T`` with ``M = [[-D, L^T], [L, sigma S S^T]]``,
    ``D = diag(s_i^T y_i)`` and ``L`` the strictly lower triangle of ``(s_i^T y_j)_{ij}`` (Byrd,
    Nocedal and Schnabel 1994, eq. 2.17): ``m`` recursive BFGS updates of ``sigma I``.

    Args:
      S, Y: ``[m, dim]`` pairs, oldest first.
      v: ``[dim]`` vector.
      valid: ``[m]`` bool mask (default all); invalid rows are ignored.
      scale: the initial scaling ``sigma`` from the newest valid pair: ``"yy/sy"``
        (``y^T y / s^T y``, Nocedal and Wright's choice; Mini-Unlearning's secant model) or
        ``"sy/ss"`` (``s^T y / s^T s``, DeltaGrad's authors' choice).
      min_scale: floor of ``sigma`` (DeltaGrad's authors use ``1e-3``). With no valid pair ``B = I``.
    """
    if scale not in ("yy/sy", "sy/ss"):
        raise ValueError(f"scale must be 'yy/sy' or 'sy/ss', got {scale!r}")
    m = S.shape[0]
    valid = jnp.ones((m,), bool) if valid is None else valid
    vm = valid.astype(S.dtype)
    S = S * vm[:, None]
    Y = Y * vm[:, None]
    SY = S @ Y.T
    SS = S @ S.T
    last = m - 1 - jnp.argmax(valid[::-1])
    any_valid = jnp.any(valid)
    if scale == "sy/ss":
        ratio = SY[last, last] / jnp.where(any_valid, SS[last, last], 1.0)
    else:
        ratio = jnp.sum(Y[last] ** 2) / jnp.maximum(SY[last, last], 1e-30)
    sigma = jnp.where(any_valid, jnp.maximum(ratio, min_scale), 1.0)
    D = jnp.diag(jnp.diag(SY))
    L = jnp.tril(SY, -1)
    M = jnp.block([[-D, L.T], [L, sigma * SS]])
    # An invalid pair has zero rows/columns in M; a unit diagonal there keeps M invertible
    # and, since its entries of the right-hand side are zero, leaves the product unchanged.
    M = M + jnp.diag(jnp.concatenate([~valid, ~valid]).astype(S.dtype))
    p = jnp.concatenate([Y @ v, sigma * (S @ v)])
    q = jnp.linalg.solve(M, p)
    return sigma * v - (Y.T @ q[:m] + sigma * (S.T @ q[m:]))


def top_eigenvalue(matvec, v0: jax.Array, products: int) -> jax.Array:
    """Largest eigenvalue of the symmetric PSD operator ``matvec`` by power iteration
    (``optax.power_iteration``) with exactly ``products`` products (no early exit, so the cost is
    known in advance), starting from ``v0``."""
    eig, _ = optax.power_iteration(matvec, v0=v0, num_iters=products - 1, error_tolerance=0.0)
    return eig


def secant_pairs(snap_params: jax.Array, snap_grads: jax.Array, count) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Consecutive secant pairs from flat snapshot rows (oldest first), with a validity mask.

    A pair is valid when both snapshots exist and it has positive curvature ``s^T y > 0``.
    """
    K = snap_params.shape[0]
    S = snap_params[1:] - snap_params[:-1]
    Y = snap_grads[1:] - snap_grads[:-1]
    filled = jnp.arange(1, K) >= (K - jnp.minimum(count, K)) + 1
    sy = jnp.sum(S * Y, axis=1)
    ok = filled & (sy > 1e-10 * jnp.sum(S * S, axis=1)) & (jnp.sum(S * S, axis=1) > 0)
    return S, Y, ok


# -- EKFAC for multinomial logistic regression --------------------------------------------


class EKFAC(NamedTuple):
    """Kronecker eigenbasis and exact diagonal of the data-term Hessian at ``w*``.

    ``UA``: ``[d+1, d+1]`` eigenvectors of ``E[x x^T]``; ``UG``: ``[C, C]`` eigenvectors of ``E[S_i]``;
    ``diag``: ``[d+1, C]`` mean over examples of ``(UA^T x_i)^2 (x) diag(UG^T S_i UG)``.
    """

    UA: jax.Array
    UG: jax.Array
    diag: jax.Array


def with_bias(x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    return jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)


def logreg_matrix(params: Params) -> jax.Array:
    """``[d+1, C]`` matrix ``[kernel; bias]`` of a :class:`~mini_unlearn_jax.core.models.LogisticRegression`."""
    dense = params["Dense_0"]
    return jnp.concatenate([dense["kernel"], dense["bias"][None]], axis=0)


def logreg_params(mat: jax.Array) -> Params:
    return {"Dense_0": {"bias": mat[-1], "kernel": mat[:-1]}}


def _ekfac_terms(basis: EKFAC | tuple, xb: jax.Array, probs: jax.Array) -> jax.Array:
    UA, UG = basis[0], basis[1]
    z2 = (xb @ UA) ** 2
    q = probs @ (UG**2) - (probs @ UG) ** 2  # diag(UG^T S_i UG), >= 0
    return z2, jnp.maximum(q, 0.0)


def ekfac_fit(x: jax.Array, probs: jax.Array, chunk: int = 8192) -> EKFAC:
    """EKFAC statistics of the full data at the model's probabilities ``probs[n, C]`` (one pass)."""
    xb = with_bias(x)
    n = xb.shape[0]
    A = jnp.zeros((xb.shape[1],) * 2, xb.dtype)
    for i in range(0, n, chunk):
        A = A + xb[i : i + chunk].T @ xb[i : i + chunk]
    A = A / n
    G = jnp.mean(probs[:, :, None] * jnp.eye(probs.shape[1]) - probs[:, :, None] * probs[:, None, :], axis=0)
    _, UA = jnp.linalg.eigh(A)
    _, UG = jnp.linalg.eigh(G)
    diag = jnp.zeros((xb.shape[1], probs.shape[1]), xb.dtype)
    for i in range(0, n, chunk):
        z2, q = _ekfac_terms((UA, UG), xb[i : i + chunk], probs[i : i + chunk])
        diag = diag + z2.T @ q
    return EKFAC(UA, UG, diag / n)


def ekfac_removed_sum(stats: EKFAC, x_removed: jax.Array, probs_removed: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum over the (masked) removed examples of their exact diagonal terms."""
    z2, q = _ekfac_terms(stats, with_bias(x_removed), probs_removed)
    return z2.T @ (q * mask[:, None])


def ekfac_solve(stats: EKFAC, diag: jax.Array, damping, mat: jax.Array) -> jax.Array:
    """``(U diag(diag) U^T + damping I)^{-1} mat`` for ``[d+1, C]`` matrices."""
    inner = stats.UA.T @ mat @ stats.UG
    return stats.UA @ (inner / (diag + damping)) @ stats.UG.T


def ekfac_product(stats: EKFAC, diag: jax.Array, mat: jax.Array) -> jax.Array:
    """``U diag(diag) U^T mat``."""
    inner = stats.UA.T @ mat @ stats.UG
    return stats.UA @ (inner * diag) @ stats.UG.T


def frozen_softmax_loss(logits: jax.Array, probs: jax.Array) -> jax.Array:
    """``0.5 z^T (diag(p) - p p^T) z``: the quadratic whose Hessian in the logits is the softmax
    cross-entropy's Hessian at probabilities ``p`` (its Gauss-Newton model there).

    With ``probs[i] = softmax(logits_i(w*))`` in place of the labels, :func:`ggn_vp` of this loss
    equals :func:`ggn_vp` of the cross-entropy at ``w*``; since the Hessian does not depend on the
    logits, XLA drops their forward computation, so each product reads ``x`` twice, not three times.
    """
    pz = probs * logits
    return 0.5 * (jnp.sum(pz * logits) - jnp.sum(pz) ** 2)


def fit_stats(objective, params: Params, x, chunk: int = 8192) -> EKFAC | None:
    """Curvature statistics to save beside a trained model: EKFAC for logistic regression, else None."""
    check_param_dtypes(params, "fit_stats: the parameters")
    if objective.kind != "logreg":
        return None
    x = jnp.asarray(x)
    probs = jnp.concatenate([jax.nn.softmax(objective.apply_fn(params, x[i : i + chunk]), -1)
                             for i in range(0, x.shape[0], chunk)])
    return ekfac_fit(x, probs, chunk)


def pcg(A, b: jax.Array, x0: jax.Array, precond, iters: int, rtol: float = 1e-6, *,
        initial_residual: bool = False):
    """Preconditioned conjugate gradients for SPD ``A``: at most ``iters`` products with ``A`` in all.

    The residual at a nonzero start ``x0`` costs one of those products (``b - A x0``); a zero
    start costs none, so CG then takes up to ``iters`` steps, otherwise ``iters - 1``. Stops once
    ``||r|| <= rtol ||b||``, when the budget is spent, or (freezing ``x``) if a non-positive or
    non-finite curvature ``p^T A p`` appears.

    Returns:
      ``(x, ||r|| / ||b||, products made)``; with ``initial_residual=True`` also
      ``||b - A x0|| / ||b||``, the relative residual of the start.
    """
    if iters < 1:
        raise ValueError(f"pcg needs iters >= 1, got {iters}")
    bnorm = jnp.maximum(jnp.linalg.norm(b), 1e-30)
    nonzero = jnp.any(x0 != 0)
    r = jax.lax.cond(nonzero, lambda: b - A(x0), lambda: b)
    used = nonzero.astype(jnp.int32)
    rel0 = jnp.linalg.norm(r) / bnorm
    z = precond(r)
    rz = jnp.vdot(r, z)
    alive = (rel0 > rtol) & jnp.isfinite(rz) & (used < iters)

    def cond(s):
        return s[-1]

    def body(s):
        x, r, p, rz, used, _ = s
        Ap = A(p)
        used = used + 1
        pAp = jnp.vdot(p, Ap)
        ok = (pAp > 0) & jnp.isfinite(pAp)
        a = jnp.where(ok, rz / jnp.where(ok, pAp, 1.0), 0.0)
        x = jnp.where(ok, x + a * p, x)
        r_new = r - a * Ap
        z = precond(r_new)
        rz_new = jnp.vdot(r_new, z)
        beta = rz_new / jnp.where(rz != 0, rz, 1.0)
        p = jnp.where(ok, z + beta * p, p)
        r = jnp.where(ok, r_new, r)
        rz = jnp.where(ok, rz_new, rz)
        alive = ok & (jnp.linalg.norm(r) > rtol * bnorm) & jnp.isfinite(rz) & (used < iters)
        return x, r, p, rz, used, alive

    x, r, _, _, used, _ = jax.lax.while_loop(cond, body, (x0, r, z, rz, used, alive))
    rel = jnp.linalg.norm(r) / bnorm
    if initial_residual:
        return x, rel, used, rel0
    return x, rel, used
