"""Mini-Unlearning: remove examples by solving a contraction-mapping fixed point.

With ``w*`` the trained parameters, ``g* = grad G_D(w*)`` (the newest snapshot in the buffer),
``R`` the removed set (``r`` examples of ``n``) and ``M`` the L2 mask, the remaining-data
gradient follows from identity (I1) with a secant model ``grad G_D(w) ~ g* + B (w - w*)``::

    g_R(w) = [ n (g* + B (w - w*)) - sum_{i in R} grad l_i(w) ] / (n - r) + l2 * M w

and the unlearned parameters are the fixed point of ``Phi(w) = w - P^{-1} g_R(w)`` (method.md
I2, preconditioned). Each iteration touches only the ``r`` removed examples (the sum of their
gradients, one backward pass of the masked loss per fixed-size chunk) and the buffer.

Curvature (``MiniConfig.curvature``):

- ``ekfac`` (logistic regression; the default there): ``B`` is the EKFAC model of the full-data
  Hessian saved at training time and ``P`` the EKFAC model of the *remaining* Hessian -- full
  statistics minus the removed examples' exact terms, positive definite at any ratio.
- ``lbfgs``: ``B`` the compact L-BFGS product from the buffer's secant pairs (DeltaGrad's model),
  ``P = L I`` with ``L`` from power iteration. Known to expand at high ratios; the guard reports it.
- ``exact``: ``B`` is the exact Gauss-Newton product over the training set at ``w*`` (one data pass
  per iteration), ``P = L I``. For small problems and tests.

Refinement (``MiniConfig.refine_passes = k > 0``, the default): ``k`` preconditioned
conjugate-gradient steps on the linearised fixed point ``H_{D\\R}(w*) d = -g_R(w*)`` started from
the fixed point, each with one exact Gauss-Newton-vector product over the remaining data (a
masked pass). ``refine_passes=0`` gives the variant that never reads the remaining data.

Requests are padded to power-of-two size buckets with a mask, so requests of new sizes within
a bucket reuse the compiled program; :func:`unlearn_many` solves several requests in one
vmapped call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from . import curvature as cv
from .models import Objective
from .snapshots import SnapshotState

Params = Any

CONVERGED, MAX_ITER, EXPANDING, NONFINITE, REFINE_FAILED = 0, 1, 2, 3, 4
REASONS = {
    CONVERGED: "converged",
    MAX_ITER: "step cap reached before the step norm fell below the tolerance; the original parameters are returned",
    EXPANDING: "the map is not contractive here (step norms grew); the original parameters are returned",
    NONFINITE: "NaN/inf appeared in the iteration; the original parameters are returned",
    REFINE_FAILED: "the refinement produced NaN/inf; the original parameters are returned",
}


@dataclasses.dataclass(frozen=True)
class MiniConfig:
    """Options of the Mini-Unlearning solver (all keyword-only in spirit; frozen, hashable).

    Attributes:
      curvature: ``auto`` (``ekfac`` for logistic regression, ``lbfgs`` otherwise), ``ekfac``,
        ``lbfgs`` or ``exact``.
      refine_passes: exact-curvature CG steps over the remaining data after the fixed point.
      max_iter: cap on fixed-point iterations.
      tol: stop when ``||w_k - w_{k-1}|| <= tol * max(1, ||w*||)``.
      chunk: removed examples per chunk of the removed-gradient sum.
      damping: added to the preconditioner's (and CG operator's) diagonal.
      min_bucket: smallest padded request size.
      mesh, mesh_axis: a ``jax.sharding.Mesh`` and axis name over which the removed examples'
        per-example gradients (and, when the training-set size divides evenly, the refinement's
        data passes) are sharded; ``None`` runs on the default device.
      stationary: treat ``w*`` as the exact optimum of the full objective, i.e. subtract its
        residual gradient ``g* + l2 M w*`` (zero after training to convergence) so that only the
        removal moves the parameters; matters for models not trained to convergence (SGD/Adam).
    """

    curvature: str = "auto"
    refine_passes: int = 4
    max_iter: int = 100
    tol: float = 1e-5
    chunk: int = 256
    damping: float = 0.0
    min_bucket: int = 64
    stationary: bool = True
    mesh: Any = None
    mesh_axis: str = "data"

    def __post_init__(self):
        if self.curvature not in ("auto", "ekfac", "lbfgs", "exact"):
            raise ValueError(f"unknown curvature {self.curvature!r}: use auto, ekfac, lbfgs or exact")
        if self.refine_passes < 0 or self.max_iter < 1 or self.chunk < 1 or self.min_bucket < 1:
            raise ValueError("refine_passes >= 0, max_iter >= 1, chunk >= 1 and min_bucket >= 1 are required")
        if self.chunk & (self.chunk - 1) or self.min_bucket & (self.min_bucket - 1):
            raise ValueError(f"chunk ({self.chunk}) and min_bucket ({self.min_bucket}) must be powers of two, so that "
                             "a chunk divides every padded request size (buckets are powers of two); e.g. chunk=128")
        if not (self.tol > 0 and self.damping >= 0):
            raise ValueError("tol must be > 0 and damping >= 0")


class UnlearnResult(NamedTuple):
    """What :func:`unlearn` returns (leaves gain a leading axis in :func:`unlearn_many`).

    ``params`` are the unlearned parameters when ``converged``; otherwise they are the input
    parameters, bit for bit (never the diverged iterate). ``contraction`` is the estimated factor
    ``q`` (ratio of the last two step norms; for a linear contraction this tends to the true
    factor from below as the iteration proceeds) and ``error_bound = q/(1-q) * step_norm`` the
    a-posteriori bound on the distance from the returned fixed-point iterate to the fixed point
    (inf when ``q >= 1``). It bounds the fixed-point solve only, i.e. before refinement.
    """

    params: Params
    converged: jax.Array
    status: jax.Array
    iterations: jax.Array
    step_norm: jax.Array
    contraction: jax.Array
    error_bound: jax.Array
    refine_passes: jax.Array
    refine_residual: jax.Array

    def reason(self) -> str | list[str]:
        """Why the solve stopped; a list with one message per request for a batched result."""
        status = np.asarray(self.status)
        if status.ndim == 0:
            return REASONS[int(status)]
        return [REASONS[int(s)] for s in status.reshape(-1)]

    def request(self, i: int) -> UnlearnResult:
        """Request ``i`` of a batched result from :func:`unlearn_many`, as a single result."""
        if np.ndim(self.status) == 0:
            raise ValueError("this is a single request's result, not a batch from unlearn_many")
        return jax.tree.map(lambda a: a[i], self)


# -- requests -----------------------------------------------------------------------------


def bucket_size(r: int, min_bucket: int = 64) -> int:
    """Smallest power of two >= max(r, min_bucket)."""
    return int(2 ** int(np.ceil(np.log2(max(int(r), int(min_bucket), 1)))))


def validate_indices(indices, n: int) -> np.ndarray:
    """Check forget indices against a training set of size ``n``; return them sorted as int32."""
    a = np.asarray(indices)
    if a.ndim != 1:
        raise ValueError(f"forget indices must be a 1-D array, got shape {a.shape}")
    if a.size == 0:
        raise ValueError("the forget set is empty: give at least one training index to remove")
    if not np.issubdtype(a.dtype, np.integer):  # one rule: 1.0 is refused like 1.5
        raise ValueError(f"forget indices must be integers, got dtype {a.dtype}; pass an integer array "
                         "(e.g. np.asarray(indices, dtype=np.int64))")
    if a.min() < 0 or a.max() >= n:
        raise ValueError(f"forget indices must lie in [0, {n}), found range [{a.min()}, {a.max()}]")
    uniq = np.unique(a)
    if uniq.size != a.size:
        raise ValueError(f"forget indices hold {a.size - uniq.size} duplicates; pass each index once")
    if uniq.size >= n:
        raise ValueError(f"the forget set covers all {n} training examples; nothing would remain to learn from")
    return uniq.astype(np.int32)


def pad_request(indices, n: int, min_bucket: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Validated indices padded to their bucket size, and the 0/1 mask of real entries."""
    idx = validate_indices(indices, n)
    size = bucket_size(idx.size, min_bucket)
    padded = np.zeros(size, np.int32)
    padded[: idx.size] = idx
    mask = np.zeros(size, np.float32)
    mask[: idx.size] = 1.0
    return padded, mask


# -- the solver ---------------------------------------------------------------------------


def _resolve_curvature(objective: Objective, cfg: MiniConfig, stats) -> str:
    kind = cfg.curvature
    if kind == "auto":
        kind = "ekfac" if (objective.kind == "logreg" and stats is not None) else "lbfgs"
    if kind == "ekfac" and (objective.kind != "logreg" or stats is None):
        raise ValueError("curvature='ekfac' needs a logistic-regression model and its EKFAC statistics "
                         "(saved by training); use curvature='lbfgs' or 'exact' for other models")
    return kind


def _shard(a, mesh, spec):
    if mesh is None:
        return a
    from jax.sharding import NamedSharding

    return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec))


def removed_grad_sum(objective: Objective, params, xr, yr, mask, chunk: int, mesh=None, axis: str = "data"):
    """``sum_i mask_i grad l_i(params)`` over removed examples, in chunks of ``chunk`` (one
    backward pass of the masked loss sum per chunk); with a ``mesh``, each chunk is split over
    ``axis``. Padding rows (mask 0) must hold finite data: ``pad_request`` repeats a real index."""
    from jax.sharding import PartitionSpec as P

    size = xr.shape[0]
    chunk = min(chunk, size)
    nc = size // chunk
    xs = _shard(xr.reshape((nc, chunk) + xr.shape[1:]), mesh, P(None, axis))
    ys = _shard(yr.reshape((nc, chunk)), mesh, P(None, axis))
    ms = _shard(mask.reshape((nc, chunk)), mesh, P(None, axis))
    zero = jax.tree.map(jnp.zeros_like, params)

    def body(acc, c):
        xc, yc, mc = c
        # the gradient of the masked sum of losses: one batched backward pass, equal to summing
        # per-example gradients but without materialising a [chunk, |w|] array of them
        def masked_sum(p):
            losses = objective.losses(p, xc, yc)
            return jnp.sum(mc.astype(losses.dtype) * losses)

        g = jax.grad(masked_sum)(params)
        return jax.tree.map(jnp.add, acc, g), None

    acc, _ = jax.lax.scan(body, zero, (xs, ys, ms))
    return acc


def _solve(objective: Objective, cfg: MiniConfig, kind: str, params, snap_params, snap_grads, snap_count,
           stats, x, y, idx, mask):
    n = x.shape[0]
    if cfg.mesh is not None and n % cfg.mesh.shape[cfg.mesh_axis] == 0:
        from jax.sharding import PartitionSpec as P

        x = _shard(x, cfg.mesh, P(cfg.mesh_axis))
        y = _shard(y, cfg.mesh, P(cfg.mesh_axis))
    dtype = ravel_pytree(params)[0].dtype
    r = jnp.sum(mask).astype(dtype)
    nr = n - r
    w0, unravel = ravel_pytree(params)
    m_vec, _ = ravel_pytree(jax.tree.map(lambda p, m: jnp.full(p.shape, float(m), p.dtype), params, objective.l2_mask(params)))
    l2 = objective.l2
    flat_rows = jax.vmap(lambda t: ravel_pytree(t)[0])
    S_all, G_all = flat_rows(snap_params), flat_rows(snap_grads)
    K = S_all.shape[0]
    newest = (snap_count - 1) % K
    g_star = G_all[newest]
    xr, yr = x[idx], y[idx]

    def removed_grad(w):
        return ravel_pytree(removed_grad_sum(objective, unravel(w), xr, yr, mask, cfg.chunk, cfg.mesh, cfg.mesh_axis))[0]

    # --- curvature models: P^{-1} (remaining data) and, outside EKFAC, B (full data) ---------
    if kind == "ekfac":
        probs_r = jax.nn.softmax(objective.apply_fn(params, xr), axis=-1)
        diag_rem = jnp.maximum(n * stats.diag - cv.ekfac_removed_sum(stats, xr, probs_r, mask), 0.0) / nr
        to_mat = lambda v: cv.logreg_matrix(unravel(v))
        to_vec = lambda m_: ravel_pytree(cv.logreg_params(m_))[0]
        precond = lambda v: to_vec(cv.ekfac_solve(stats, diag_rem, l2 + cfg.damping, to_mat(v)))
    else:
        if kind == "lbfgs":
            # rows oldest -> newest
            order = (jnp.arange(K) + snap_count) % K
            S, Y, pair_ok = cv.secant_pairs(S_all[order], G_all[order], snap_count)
            B = lambda v: cv.lbfgs_hessian_product(S, Y, pair_ok, v)
        else:
            keep_all = jnp.ones((n,), dtype)
            B = lambda v: ravel_pytree(cv.ggn_vp(objective, params, x, y, keep_all, unravel(v)))[0]

        def power(_, v):
            u = B(v)
            return u / jnp.maximum(jnp.linalg.norm(u), 1e-30)

        v0 = jax.random.normal(jax.random.key(0), w0.shape, dtype)
        v = jax.lax.fori_loop(0, 30, power, v0 / jnp.linalg.norm(v0))
        lmax = jnp.vdot(v, B(v))
        L = (n / nr) * jnp.maximum(lmax, 0.0) + l2 + cfg.damping
        L = jnp.where(jnp.isfinite(L) & (L > 0), L, 1.0)
        precond = lambda v: v / L

    # the trained model's own residual gradient (zero for a model trained to convergence): with
    # `stationary`, w* is treated as the optimum of the full objective, so only the removal moves it
    shift = (g_star + l2 * m_vec * w0) if cfg.stationary else jnp.zeros_like(w0)
    if kind == "ekfac":
        # Removed examples enter through the same EKFAC model as the full data (their exact
        # gradient at w*, their exact EKFAC terms for curvature): the model Hessian is then
        # the PSD remaining-data EKFAC, never approximate-minus-exact.
        g_at_w0 = (n * g_star - removed_grad(w0)) / nr + l2 * m_vec * w0 - shift
        K_rem = lambda v: to_vec(cv.ekfac_product(stats, diag_rem, to_mat(v))) + l2 * m_vec * v

        def g_rem(w):
            return g_at_w0 + K_rem(w - w0)
    else:
        def g_rem(w):
            return (n * (g_star + B(w - w0)) - removed_grad(w)) / nr + l2 * m_vec * w - shift

    def phi(w):
        return w - precond(g_rem(w))

    scale = jnp.maximum(1.0, jnp.linalg.norm(w0))

    # --- fixed point with a divergence guard ----------------------------------------------
    class Loop(NamedTuple):
        k: jax.Array
        w: jax.Array
        step: jax.Array
        q: jax.Array
        grow: jax.Array
        status: jax.Array  # -1 running

    def cond(s: Loop):
        return s.status < 0

    def body(s: Loop):
        w_new = phi(s.w)
        step = jnp.linalg.norm(w_new - s.w)
        q = jnp.where(s.k > 0, step / jnp.maximum(s.step, 1e-30), 0.0)
        grow = jnp.where((s.k > 0) & (q >= 1.0), s.grow + 1, 0)
        finite = jnp.all(jnp.isfinite(w_new)) & jnp.isfinite(step)
        k = s.k + 1
        status = jnp.where(~finite, NONFINITE,
                 jnp.where(grow >= 3, EXPANDING,
                 jnp.where((step <= cfg.tol * scale) & (q < 1.0), CONVERGED,
                 jnp.where(k >= cfg.max_iter, MAX_ITER, -1))))
        w_keep = jnp.where(finite, w_new, s.w)
        return Loop(k, w_keep, step, jnp.where(s.k > 0, q, s.q), grow, status.astype(jnp.int32))

    init = Loop(jnp.zeros((), jnp.int32), w0, jnp.asarray(jnp.inf, dtype), jnp.asarray(0.0, dtype), jnp.zeros((), jnp.int32), jnp.asarray(-1, jnp.int32))
    fp = jax.lax.while_loop(cond, body, init)
    q = fp.q
    bound = jnp.where(q < 1.0, q / (1.0 - q) * fp.step, jnp.inf)
    ok = (fp.status == CONVERGED) | ((fp.status == MAX_ITER) & (q < 1.0))
    w_fp = jnp.where(ok, fp.w, w0)

    # --- refinement: preconditioned CG on the linearised fixed point ----------------------
    refine_res = jnp.asarray(jnp.nan, dtype)
    status = fp.status
    w_out = w_fp
    if cfg.refine_passes > 0:
        keep = jnp.ones((n,), dtype).at[idx].multiply(1.0 - mask.astype(dtype))

        def H(v):
            gv = ravel_pytree(cv.ggn_vp(objective, params, x, y, keep, unravel(v)))[0]
            return gv + (l2 * m_vec + cfg.damping) * v

        d0 = jnp.where(ok, w_fp - w0, 0.0)
        d, refine_res, _ = cv.pcg(H, -g_rem(w0), d0, precond, cfg.refine_passes)
        w_ref = w0 + d
        good = jnp.all(jnp.isfinite(w_ref))
        w_out = jnp.where(good, w_ref, w0)
        status = jnp.where(good, status, REFINE_FAILED)
        # a failed fixed point still counts as failed: refinement does not hide it
        w_out = jnp.where(ok, w_out, w0)

    converged = (status == CONVERGED)
    out_params = unravel(w_out)
    if objective.canonicalize is not None:
        out_params = objective.canonicalize(out_params)
    # a request that did not converge returns its input parameters bit for bit (selected, not
    # recomputed: unravel/canonicalize of w0 may differ from them by rounding)
    out_params = jax.tree.map(lambda new, old: jnp.where(converged, new.astype(old.dtype), old), out_params, params)
    return UnlearnResult(
        params=out_params,
        converged=converged,
        status=status.astype(jnp.int32),
        iterations=fp.k,
        step_norm=fp.step,
        contraction=q,
        error_bound=bound,
        refine_passes=jnp.asarray(cfg.refine_passes, jnp.int32),
        refine_residual=refine_res,
    )


_solve_jit = jax.jit(_solve, static_argnums=(0, 1, 2))


def _solve_many(objective, cfg, kind, params, sp, sg, sc, stats, x, y, idx, mask):
    return jax.vmap(_solve, in_axes=(None, None, None, None, None, None, None, None, None, None, 0, 0))(
        objective, cfg, kind, params, sp, sg, sc, stats, x, y, idx, mask)


_solve_many_jit = jax.jit(_solve_many, static_argnums=(0, 1, 2))


def _check_inputs(params, snapshots: SnapshotState, x, y, stats) -> int:
    """Validate shapes before tracing; returns n. Raises ValueError naming the problem."""
    if np.ndim(x) < 2 or np.ndim(y) != 1 or np.shape(x)[0] != np.shape(y)[0]:
        raise ValueError(f"x must be [n, features...] and y [n] with the same n; got {np.shape(x)} and {np.shape(y)}")
    if int(snapshots.count) < 1:
        raise ValueError("the snapshot buffer is empty: train with Trainer.fit (it records the final parameters)")
    p_struct = jax.tree.structure(params)
    if jax.tree.structure(snapshots.params) != p_struct:
        raise ValueError("the snapshot buffer was recorded for a different parameter structure than `params`")
    for p, sp in zip(jax.tree.leaves(params), jax.tree.leaves(snapshots.params), strict=True):
        if np.shape(sp)[1:] != np.shape(p):
            raise ValueError(f"snapshot leaf shape {np.shape(sp)[1:]} does not match parameter shape {np.shape(p)}")
    if stats is not None and np.shape(stats.UA)[0] != int(np.prod(np.shape(x)[1:])) + 1:
        raise ValueError(f"EKFAC statistics are for {np.shape(stats.UA)[0] - 1} features, the data has "
                         f"{int(np.prod(np.shape(x)[1:]))}; refit them with fit_stats on this data")
    return int(np.shape(x)[0])


def unlearn(objective: Objective, params: Params, snapshots: SnapshotState, x, y, forget, *,
            stats: cv.EKFAC | None = None, config: MiniConfig = MiniConfig()) -> UnlearnResult:
    """Remove the training examples ``forget`` (indices into ``x``/``y``) from a trained model.

    Args:
      objective: the training objective (model, per-example loss, L2).
      params: the trained parameters ``w*``.
      snapshots: the snapshot buffer from training; its newest entry must be ``(w*, grad G_D(w*))``.
      x, y: the full training set the model was trained on (only removed rows are read by the
        fixed point; the refinement, if enabled, reads the rest).
      forget: 1-D integer indices to remove.
      stats: EKFAC statistics saved at training time (logistic regression).
      config: :class:`MiniConfig`.
    """
    n = _check_inputs(params, snapshots, x, y, stats)
    idx, mask = pad_request(forget, n, config.min_bucket)
    kind = _resolve_curvature(objective, config, stats)
    return _solve_jit(objective, config, kind, params, snapshots.params, snapshots.grads, snapshots.count,
                      stats, jnp.asarray(x), jnp.asarray(y), jnp.asarray(idx), jnp.asarray(mask))


def unlearn_many(objective: Objective, params: Params, snapshots: SnapshotState, x, y, requests, *,
                 stats: cv.EKFAC | None = None, config: MiniConfig = MiniConfig()) -> UnlearnResult:
    """Solve several independent deletion requests in one vmapped call (padded to a common bucket)."""
    n = _check_inputs(params, snapshots, x, y, stats)
    if len(requests) == 0:
        raise ValueError("no deletion requests given")
    padded = [pad_request(r, n, config.min_bucket) for r in requests]
    size = max(p[0].size for p in padded)
    idx = np.zeros((len(padded), size), np.int32)
    mask = np.zeros((len(padded), size), np.float32)
    for i, (pi, mi) in enumerate(padded):
        idx[i, : pi.size], mask[i, : mi.size] = pi, mi
    kind = _resolve_curvature(objective, config, stats)
    return _solve_many_jit(objective, config, kind, params, snapshots.params, snapshots.grads, snapshots.count,
                           stats, jnp.asarray(x), jnp.asarray(y), jnp.asarray(idx), jnp.asarray(mask))
