"""Curvature models used by the unlearning solvers.

- :func:`hvp`, :func:`ggn_vp`: exact Hessian- and Gauss-Newton-vector products (``jax.jvp``);
  :func:`frozen_softmax_loss`: the cross-entropy's Gauss-Newton model at fixed probabilities
  (products from probabilities computed once).
- :func:`lbfgs_hessian_product`: the compact L-BFGS quasi-Hessian ``B v`` of Byrd, Nocedal and
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


def lbfgs_hessian_product(S: jax.Array, Y: jax.Array, valid: jax.Array, v: jax.Array, gamma=None) -> jax.Array:
    """Compact BFGS quasi-Hessian product ``B v`` from pairs in rows of ``S``, ``Y`` (oldest first).

    ``B = g I - [g S^T, Y^T] M^{-1} [g S; Y]`` with ``M = [[g S S^T, L], [L^T, -D]]``, ``L`` the
    strictly lower part of ``S Y^T`` and ``D`` its diagonal (Byrd, Nocedal & Schnabel 1994,
    eq. 2.17), ``g = y^T y / s^T y`` of the newest valid pair unless given. Invalid rows
    (``valid`` false) are ignored.

    Args:
      S, Y: ``[m, dim]``. valid: ``[m]`` bool. v: ``[dim]``.
    """
    m = S.shape[0]
    vf = valid.astype(S.dtype)
    S = S * vf[:, None]
    Y = Y * vf[:, None]
    sy = jnp.sum(S * Y, axis=1)
    if gamma is None:
        last = jnp.max(jnp.where(valid, jnp.arange(m), -1))
        gamma = jnp.where(last >= 0, jnp.sum(Y[last] ** 2) / jnp.maximum(sy[last], 1e-30), 1.0)
    SY = S @ Y.T
    L = jnp.tril(SY, -1)
    D = jnp.diag(jnp.where(valid, sy, 1.0))
    M = jnp.block([[gamma * S @ S.T + jnp.diag(1.0 - vf), L], [L.T, -D]])
    rhs = jnp.concatenate([gamma * S @ v, Y @ v])
    sol = jnp.linalg.solve(M, rhs)
    return gamma * v - (gamma * S.T @ sol[:m] + Y.T @ sol[m:])


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
    """``[d+1, C]`` matrix ``[kernel; bias]`` of a :class:`~mini_unlearn_jax.models.LogisticRegression`."""
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
