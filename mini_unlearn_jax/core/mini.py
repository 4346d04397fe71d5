"""Mini-Unlearning: remove examples by solving a contraction-mapping fixed point.

With ``w*`` the trained parameters, ``g* = grad G_D(w*)`` (the newest snapshot in the buffer),
``R`` the removed set (``r`` examples of ``n``) and ``M`` the L2 mask, the remaining-data
gradient follows from identity (I1) with a secant model ``grad G_D(w) ~ g* + B (w - w*)``::

    g_R(w) = [ n (g* + B (w - w*)) - sum_{i in R} grad l_i(w) ] / (n - r) + l2 * M w

and the unlearned parameters are the fixed point of ``Phi(w) = w - P^{-1} g_R(w)`` (docs/method.md,
I2, preconditioned).

Curvature (``MiniConfig.curvature``): ``ekfac`` (logistic regression; an affine model of ``g_R``
with the EKFAC remaining-data Hessian ``K`` and ``P = K + l2 I``), ``lbfgs`` (``B`` the compact
L-BFGS product of the buffer's secant pairs, ``P = L I``) or ``exact`` (``B`` the exact
Gauss-Newton product); how each is built is in `core/mini_curvature.py`, and the result's
``stats.curvature`` says which path ran.

Termination (the result codes, their messages and the result type are in `core/mini_result.py`):

- ``CONVERGED``: the step norm fell to ``tol * max(1, ||w*||)``. ``AT_RESOLUTION``: the step is at
  the resolution of the dtype (``<= 16 eps ||w||``) and stopped shrinking (or the step cap came
  there), i.e. round-off stalls the iteration before the tolerance. Both succeed.
- The rate estimate is the geometric mean of the last (up to 4) step-norm ratios, reported only
  once 2 ratios exist; before that it is NaN and so is the error estimate ``q/(1-q) * step``.
  That figure is an *estimate* of the fixed-point iterate's distance to the fixed point of the
  model map, not a bound (``q`` is estimated).
- ``EXPANDING`` (failure): 3 consecutive ratios above 1.02 with the step above twice its smallest
  value so far; ``NONFINITE``: NaN/inf. A ratio wobbling around 1 is neither.
- At the step cap the rate estimate decides the message: ``MAX_ITER`` (still shrinking, or too few
  steps to tell) or ``NOT_CONTRACTING``. Both are failures.

Refinement (``MiniConfig.refine_passes = k > 0``; by default 13 on the EKFAC path, 5 on the
others): preconditioned conjugate gradients
on the linearised fixed point ``H_{D\\R}(w*) d = -g_R(w*)`` started from the fixed point, with
exactly ``k`` exact Gauss-Newton-vector products over the remaining data (masked passes): one for
the residual at the start, ``k - 1`` CG steps (fewer if CG converges). It is judged by its
relative residual ``||H d + g_R(w*)|| / ||g_R(w*)||`` (1 is the residual of not moving): below 1
it is accepted, as long as the refined point's remaining-data objective (two forward reads of
the data, in the time but not in ``data_passes``) is at most the fixed-point iterate's (``REFINE_ROSE``, a success,
returns the fixed-point iterate: on a non-convex model the residual of the linear model can fall
while its step wrecks the model); otherwise the fixed-point iterate is returned if its own
residual is below 1 (``REFINE_NO_PROGRESS``, a success), else the input parameters
(``REFINE_FAILED``).
On the EKFAC path the products use the softmax probabilities at ``w*``, computed once (one forward
read of the data, not counted in ``data_passes`` but in the time), through the loss
`linalg.frozen_softmax_loss`: each product then reads the data twice instead of three
times. ``refine_passes=0`` gives the variant that never reads the remaining data.

A request that does not succeed returns its input parameters bit for bit. `fixed_point_unlearn` raises
`UnlearnError` (carrying the result) unless ``throw=False``; `fixed_point_unlearn_many` returns
per-request results (``throw=False`` by default). Requests are padded to power-of-two size
buckets with a mask, and `fixed_point_unlearn_many` pads the number of requests to a power of two, so
requests of new sizes (or counts) within a bucket reuse the compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from . import linalg as cv
from .mini_curvature import (
    CURVATURES,
    POWER_ITERATIONS,
    ekfac_model,
    resolve_curvature,
    secant_model,
)
from .mini_result import (
    AT_RESOLUTION,
    CONVERGED,
    EXPANDING,
    MAX_ITER,
    NONFINITE,
    NOT_CONTRACTING,
    REFINE_FAILED,
    REFINE_NO_PROGRESS,
    REFINE_ROSE,
    SUCCESS,
    UnlearnError,
    UnlearnResult,
    UnlearnStats,
)
from .models import Objective
from .snapshots import SnapshotState

Params = Any

# the refined point is kept only if its remaining-data objective is at most the fixed-point
# iterate's, up to this relative slack (float32 summation noise over the data)
REFINE_OBJECTIVE_RTOL = 1e-5
# refinement passes of MiniConfig(refine_passes=None) per curvature path (see MiniConfig)
DEFAULT_REFINE_PASSES = {"ekfac": 13, "lbfgs": 5, "exact": 5}

# termination constants (see the module docstring)
RATE_WINDOW = 4  # the rate estimate is the geometric mean of up to this many last step ratios
MIN_RATIOS = 2  # ... reported only once this many ratios exist
GROW_MARGIN, GROW_COUNT, GROW_FACTOR = 0.02, 3, 2.0  # expanding: GROW_COUNT ratios > 1 + margin in a row
RESOLUTION = 16.0  # a step <= RESOLUTION * eps * ||w|| is at the dtype's resolution


@dataclasses.dataclass(frozen=True)
class MiniConfig:
    """Options of the Mini-Unlearning solver (all keyword-only in spirit; frozen, hashable).

    Attributes:
      curvature: ``auto`` (``ekfac`` for logistic regression with the plain softmax cross-entropy
        and EKFAC statistics, ``lbfgs`` otherwise), ``ekfac``, ``lbfgs`` or ``exact``.
      refine_passes: exact Gauss-Newton products over the remaining data after the fixed point
        (data passes): one for the residual at the fixed point, the rest conjugate-gradient steps.
        ``None`` (the default) picks by curvature path: 13 on the EKFAC path, where a product is
        cheap and the EKFAC model preconditions well, and 5 on the others (non-convex models,
        where each product costs more and more passes buy little; method.md section 6).
      max_iter: cap on fixed-point iterations.
      tol: stop when ``||w_k - w_{k-1}|| <= tol * max(1, ||w*||)`` (or at the dtype's resolution).
      chunk: removed examples per chunk of the removed-gradient sum.
      damping: added to the preconditioner's (and CG operator's) diagonal.
      min_bucket: smallest padded request size.
      mesh, mesh_axis: a ``jax.sharding.Mesh`` and axis name over which the removed examples'
        per-example gradients (and, when the training-set size divides evenly, the refinement's
        data passes) are sharded; ``None`` runs on the default device.
      precond_sample: on the EKFAC path, the removed examples' curvature terms (which make the
        remaining-data model) are summed over at most this many of them, spread evenly over the
        request and scaled to all ``r`` (0: all of them). Their cost is ``(d+1)^2`` per example,
        the largest setup cost at high ratios; they shape only the preconditioner and the start,
        while the refinement's residual and the removed gradient stay exact.
      stationary: treat ``w*`` as the exact optimum of the full objective, i.e. subtract its
        residual gradient ``g* + l2 M w*`` (zero after training to convergence) so that only the
        removal moves the parameters; matters for models not trained to convergence (SGD/Adam).
    """

    curvature: str = "auto"
    refine_passes: int | None = None  # None: DEFAULT_REFINE_PASSES[curvature path]
    max_iter: int = 100
    tol: float = 1e-5
    chunk: int = 256
    damping: float = 0.0
    min_bucket: int = 64
    stationary: bool = True
    precond_sample: int = 1024
    mesh: Any = None
    mesh_axis: str = "data"

    def __post_init__(self):
        if self.curvature not in ("auto", "ekfac", "lbfgs", "exact"):
            raise ValueError(f"unknown curvature {self.curvature!r}: use auto, ekfac, lbfgs or exact")
        if (self.refine_passes is not None and self.refine_passes < 0) or self.max_iter < 1 or self.chunk < 1 or self.min_bucket < 1:
            raise ValueError("refine_passes >= 0, max_iter >= 1, chunk >= 1 and min_bucket >= 1 are required")
        if self.chunk & (self.chunk - 1) or self.min_bucket & (self.min_bucket - 1):
            raise ValueError(f"chunk ({self.chunk}) and min_bucket ({self.min_bucket}) must be powers of two, so that "
                             "a chunk divides every padded request size (buckets are powers of two); e.g. chunk=128")
        if self.precond_sample < 0:
            raise ValueError(f"precond_sample must be >= 0 (0: all removed examples), got {self.precond_sample}")
        if not (self.tol > 0 and self.damping >= 0):
            raise ValueError("tol must be > 0 and damping >= 0")


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


def _rate(hist: jax.Array, k: jax.Array):
    """Geometric mean of the last ``min(k - 1, RATE_WINDOW)`` step ratios from ``hist`` (the last
    ``RATE_WINDOW + 1`` step norms, newest last), and how many ratios that is."""
    m = jnp.minimum(k - 1, RATE_WINDOW)
    ms = jnp.maximum(m, 1)
    new, old = hist[RATE_WINDOW], hist[RATE_WINDOW - ms]
    q = jnp.where(old > 0, (new / jnp.where(old > 0, old, 1.0)) ** (1.0 / ms.astype(hist.dtype)), jnp.inf)
    return q, m


def _solve(objective: Objective, cfg: MiniConfig, kind: str, params, snap_params, snap_grads, snap_count,
           stats, x, y, idx, mask):
    n = x.shape[0]
    w0, unravel = ravel_pytree(params)
    dtype = w0.dtype
    # one dtype throughout: the parameters' (under x64, statistics or data may come in float64)
    if jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(dtype)
    if stats is not None:
        stats = jax.tree.map(lambda a: a.astype(dtype), stats)
    mask = mask.astype(dtype)
    if cfg.mesh is not None and n % cfg.mesh.shape[cfg.mesh_axis] == 0:
        from jax.sharding import PartitionSpec as P

        x = _shard(x, cfg.mesh, P(cfg.mesh_axis))
        y = _shard(y, cfg.mesh, P(cfg.mesh_axis))
    r = jnp.sum(mask)
    nr = n - r
    m_vec, _ = ravel_pytree(jax.tree.map(lambda p, m: jnp.full(p.shape, float(m), p.dtype), params, objective.l2_mask(params)))
    m_vec = m_vec.astype(dtype)
    l2 = objective.l2
    flat_rows = jax.vmap(lambda t: ravel_pytree(t)[0].astype(dtype))
    S_all, G_all = flat_rows(snap_params), flat_rows(snap_grads)
    K = S_all.shape[0]
    newest = (snap_count - 1) % K
    g_star = G_all[newest]
    xr, yr = x[idx], y[idx]
    passes_per_B = 0  # full-data passes per product with B

    def removed_grad(w):
        return ravel_pytree(removed_grad_sum(objective, unravel(w), xr, yr, mask, cfg.chunk, cfg.mesh, cfg.mesh_axis))[0]

    # --- curvature models (core/mini_curvature.py): P^{-1} and K (EKFAC) or B (full data) ----
    setup_passes = 0
    if kind == "ekfac":
        precond, K_rem = ekfac_model(objective, cfg, stats, params, unravel, m_vec, xr, mask, n, nr)
    else:
        B, precond, passes_per_B = secant_model(kind, objective, cfg, params, unravel, w0, x, y, S_all, G_all,
                                                snap_count, n, nr)
        setup_passes = POWER_ITERATIONS * passes_per_B

    # the trained model's own residual gradient (zero for a model trained to convergence): with
    # `stationary`, w* is treated as the optimum of the full objective, so only the removal moves it
    shift = (g_star + l2 * m_vec * w0) if cfg.stationary else jnp.zeros_like(w0)
    # g_R(w*) with the removed examples' exact gradient at w* (B (w* - w*) = 0 needs no product)
    g_at_w0 = (n * g_star - removed_grad(w0)) / nr + l2 * m_vec * w0 - shift
    if kind == "ekfac":
        # g_R is affine on the EKFAC path: the removed examples' exact gradient at w*, then K
        def g_rem(w):
            return g_at_w0 + K_rem(w - w0)
    else:
        def g_rem(w):
            return (n * (g_star + B(w - w0)) - removed_grad(w)) / nr + l2 * m_vec * w - shift

    def phi(w):
        return w - precond(g_rem(w))

    scale = jnp.maximum(1.0, jnp.linalg.norm(w0))
    eps = jnp.finfo(dtype).eps

    # --- fixed point with termination rules (module docstring) -----------------------------
    class Loop(NamedTuple):
        k: jax.Array
        w: jax.Array
        hist: jax.Array  # the last RATE_WINDOW + 1 step norms, newest last
        min_step: jax.Array
        grow: jax.Array  # consecutive ratios above 1 + GROW_MARGIN
        status: jax.Array  # -1 running

    def cond(s: Loop):
        return s.status < 0

    def body(s: Loop):
        w_new = phi(s.w)
        step = jnp.linalg.norm(w_new - s.w)
        finite = jnp.all(jnp.isfinite(w_new)) & jnp.isfinite(step)
        k = s.k + 1
        prev = s.hist[RATE_WINDOW]
        hist = jnp.concatenate([s.hist[1:], step[None]])
        grow = jnp.where((k >= 2) & (step > (1.0 + GROW_MARGIN) * prev), s.grow + 1, 0)
        expanding = (grow >= GROW_COUNT) & (step > GROW_FACTOR * s.min_step)
        converged = step <= cfg.tol * scale
        # at the dtype's resolution and no longer shrinking: round-off stalls the iteration
        small = step <= RESOLUTION * eps * jnp.linalg.norm(w_new)
        stalled = small & (step >= (1.0 - GROW_MARGIN) * prev)
        q, m = _rate(hist, k)
        capped = jnp.where(small, AT_RESOLUTION,
                 jnp.where((m >= MIN_RATIOS) & (q >= 1.0), NOT_CONTRACTING, MAX_ITER))
        status = jnp.where(~finite, NONFINITE,
                 jnp.where(converged, CONVERGED,
                 jnp.where(stalled, AT_RESOLUTION,
                 jnp.where(expanding, EXPANDING,
                 jnp.where(k >= cfg.max_iter, capped, -1)))))
        w_keep = jnp.where(finite, w_new, s.w)
        return Loop(k, w_keep, hist, jnp.minimum(s.min_step, step), grow, status.astype(jnp.int32))

    init = Loop(jnp.zeros((), jnp.int32), w0, jnp.full((RATE_WINDOW + 1,), jnp.nan, dtype),
                jnp.asarray(jnp.inf, dtype), jnp.zeros((), jnp.int32), jnp.asarray(-1, jnp.int32))
    fp = jax.lax.while_loop(cond, body, init)
    step = fp.hist[RATE_WINDOW]
    q_all, m = _rate(fp.hist, fp.k)
    trusted = m >= MIN_RATIOS
    q = jnp.where(trusted, q_all, jnp.nan)
    estimate = jnp.where(~trusted, jnp.nan,
               jnp.where(q < 1.0, q / (1.0 - q) * step,
               jnp.where(fp.status == AT_RESOLUTION, jnp.nan, jnp.inf)))
    fp_ok = (fp.status == CONVERGED) | (fp.status == AT_RESOLUTION)
    w_fp = jnp.where(fp_ok, fp.w, w0)
    data_passes = setup_passes + passes_per_B * fp.k

    # --- refinement: preconditioned CG on the linearised fixed point, judged by its residual --
    nan = jnp.asarray(jnp.nan, dtype)
    refine_res, fp_res, refine_used = nan, nan, jnp.zeros((), jnp.int32)
    status = fp.status
    w_out = w_fp
    refine_passes = cfg.refine_passes if cfg.refine_passes is not None else DEFAULT_REFINE_PASSES[kind]
    if refine_passes > 0:
        keep = jnp.ones((n,), dtype).at[idx].multiply(1.0 - mask)

        obj_h, y_h = objective, y
        if kind == "ekfac":
            # softmax cross-entropy's Gauss-Newton model at w*: probabilities read once (one
            # forward read of the data), then every product reads the data twice (x v, x^T h)
            # instead of three times (the logits at w* are not recomputed per product)
            probs = jax.nn.softmax(objective.apply_fn(params, x), axis=-1).astype(dtype)
            obj_h, y_h = dataclasses.replace(objective, example_loss=cv.frozen_softmax_loss), probs

        def H(v):
            gv = ravel_pytree(cv.ggn_vp(obj_h, params, x, y_h, keep, unravel(v)))[0]
            return gv + (l2 * m_vec + cfg.damping) * v

        def refine(_):
            return cv.pcg(H, -g_at_w0, w_fp - w0, precond, refine_passes, initial_residual=True)

        def skip(_):  # a failed fixed point is not refined (its input parameters are returned)
            return jnp.zeros_like(w0), nan, jnp.zeros((), jnp.int32), nan

        d, refine_res, refine_used, fp_res = jax.lax.cond(fp_ok, refine, skip, None)
        residual_ok = jnp.all(jnp.isfinite(d)) & (refine_res < 1.0)
        fp_holds = fp_res < 1.0
        # the linear model's residual can fall while the step leaves the region where the model
        # holds (a non-convex objective): the refined point must not raise the true remaining-data
        # objective above the fixed-point iterate's (two forward passes over the data)
        f_rem = lambda w: objective.value(unravel(w), x, y, keep)
        f_fp, f_ref = f_rem(w_fp), f_rem(w0 + d)
        rose = residual_ok & fp_holds & ~(f_ref <= f_fp + REFINE_OBJECTIVE_RTOL * jnp.abs(f_fp))
        refined_ok = residual_ok & ~rose
        w_out = jnp.where(refined_ok, w0 + d, jnp.where(fp_holds, w_fp, w0))
        # a failed fixed point stays failed: the refinement does not hide it
        status = jnp.where(~fp_ok, fp.status,
                 jnp.where(refined_ok, fp.status,
                 jnp.where(rose, REFINE_ROSE,
                 jnp.where(fp_holds, REFINE_NO_PROGRESS, REFINE_FAILED))))
        data_passes = data_passes + refine_used

    status = status.astype(jnp.int32)
    converged = jnp.any(status == jnp.asarray(SUCCESS, jnp.int32))
    out_params = unravel(w_out)
    if objective.canonicalize is not None:
        out_params = objective.canonicalize(out_params)
    # a request that did not converge returns its input parameters bit for bit (selected, not
    # recomputed: unravel/canonicalize of w0 may differ from them by rounding)
    out_params = jax.tree.map(lambda new, old: jnp.where(converged, new.astype(old.dtype), old), out_params, params)
    stats_out = UnlearnStats(
        iterations=fp.k, data_passes=jnp.asarray(data_passes, jnp.int32), rate=q, rate_ratios=m.astype(jnp.int32),
        step_norm=step, min_step_norm=fp.min_step, fixed_point_residual=fp_res, refine_residual=refine_res,
        refine_passes=refine_used, curvature=jnp.asarray(CURVATURES.index(kind), jnp.int32))
    return UnlearnResult(
        params=out_params,
        converged=converged,
        status=status,
        iterations=fp.k,
        step_norm=step,
        contraction=q,
        error_estimate=estimate,
        refine_passes=refine_used,
        refine_residual=refine_res,
        stats=stats_out,
    )


solve_jit = jax.jit(_solve, static_argnums=(0, 1, 2))


def _solve_many(objective, cfg, kind, params, sp, sg, sc, stats, x, y, idx, mask):
    return jax.vmap(_solve, in_axes=(None, None, None, None, None, None, None, None, None, None, 0, 0))(
        objective, cfg, kind, params, sp, sg, sc, stats, x, y, idx, mask)


_solve_many_jit = jax.jit(_solve_many, static_argnums=(0, 1, 2))


def unlearn_core(objective: Objective, params: Params, snapshots: SnapshotState, x, y, idx, mask, *,
                 stats: cv.EKFAC | None = None, config: MiniConfig = MiniConfig()) -> UnlearnResult:
    """The traceable core of `fixed_point_unlearn`: call it inside your own ``jax.jit`` / ``jax.vmap``.

    The forget set is given as arrays: ``idx[r]`` integer indices into ``x``/``y`` and ``mask[r]``
    with 1 for a real entry and 0 for padding (what `pad_request` makes; a fixed ``r``
    compiles once for every request of up to ``r`` examples). Every argument except
    ``objective``, ``config`` and whether ``stats`` is given may be traced (the snapshot buffer,
    the indices, the mask, the data). No Python-level checks run here and nothing raises on
    failure: check ``result.converged`` (a failed request holds the input parameters). Use
    `fixed_point_unlearn` for checked single requests.
    """
    with jax.ensure_compile_time_eval():  # the curvature path depends only on static facts
        kind = resolve_curvature(objective, config, stats)
    return _solve(objective, config, kind, params, snapshots.params, snapshots.grads, snapshots.count, stats,
                  jnp.asarray(x), jnp.asarray(y), jnp.asarray(idx), jnp.asarray(mask))


def _check_inputs(params, snapshots: SnapshotState, x, y, stats) -> int:
    """Validate shapes and the buffer before tracing; returns n. Raises ValueError naming the problem."""
    if np.ndim(x) < 2 or np.ndim(y) != 1 or np.shape(x)[0] != np.shape(y)[0]:
        raise ValueError(f"x must be [n, features...] and y [n] with the same n; got {np.shape(x)} and {np.shape(y)}")
    low = sorted({str(jnp.result_type(a)) for a in jax.tree.leaves(params)
                  if jnp.issubdtype(jnp.result_type(a), jnp.floating) and jnp.finfo(jnp.result_type(a)).bits < 32})
    if low:
        raise ValueError(f"parameters in {', '.join(low)}: the fixed point and the conjugate-gradient refinement need "
                         "float32 or float64 (at 8 bits of mantissa their steps vanish into rounding); cast with "
                         "jax.tree.map(lambda a: a.astype(jnp.float32), params) and cast the result back if you must")
    count = int(snapshots.count)
    if count < 1:
        raise ValueError("the snapshot buffer is empty: train with Trainer.fit (it records the final parameters)")
    p_struct = jax.tree.structure(params)
    if jax.tree.structure(snapshots.params) != p_struct:
        raise ValueError("the snapshot buffer was recorded for a different parameter structure than `params`")
    for p, sp in zip(jax.tree.leaves(params), jax.tree.leaves(snapshots.params), strict=True):
        if np.shape(sp)[1:] != np.shape(p):
            raise ValueError(f"snapshot leaf shape {np.shape(sp)[1:]} does not match parameter shape {np.shape(p)}")
    _check_buffer_is_current(params, snapshots, count)
    if stats is not None and np.shape(stats.UA)[0] != int(np.prod(np.shape(x)[1:])) + 1:
        raise ValueError(f"EKFAC statistics are for {np.shape(stats.UA)[0] - 1} features, the data has "
                         f"{int(np.prod(np.shape(x)[1:]))}; refit them with fit_stats on this data")
    return int(np.shape(x)[0])


def _check_buffer_is_current(params, snapshots: SnapshotState, count: int) -> None:
    """The newest snapshot must hold ``params`` (to a few hundred ulps of the coarser dtype, relative
    to the parameters' scale): the solver takes ``g*`` there. Arrays that this process cannot read
    whole (multi-process sharding) are not compared."""
    leaves, snaps = jax.tree.leaves(params), jax.tree.leaves(snapshots.params)
    if not all(getattr(a, "is_fully_addressable", True) for a in leaves + snaps):
        return
    slot = (count - 1) % int(np.shape(snaps[0])[0])
    diff, size, tol_eps = 0.0, 1.0, 0.0
    for p, sp in zip(leaves, snaps, strict=True):
        a = np.asarray(p).astype(np.float64)
        b = np.asarray(sp[slot]).astype(np.float64)
        if a.size:
            diff = max(diff, float(np.max(np.abs(a - b))))
            size = max(size, float(np.max(np.abs(a))))
        tol_eps = max(tol_eps, float(jnp.finfo(jnp.result_type(p)).eps), float(jnp.finfo(jnp.result_type(sp)).eps))
    if not diff <= 100 * tol_eps * size:  # NaN differences count as stale too
        raise ValueError(
            f"the snapshot buffer is stale: its newest entry differs from `params` by {diff:.3g} (max abs; "
            f"parameter scale {size:.3g}), but the solver takes the full-data gradient there. Pass the buffer "
            "recorded with these parameters (Trainer.fit writes the final ones), or refresh it for them with "
            "methods.after_removal (after an unlearning request) or your buffer's update(..., force=True)")


def _throw(result: UnlearnResult, batch: bool) -> None:
    if not batch:
        raise UnlearnError(
            f"unlearning failed: {result.reason()} [status {result.status_name()}, {int(result.iterations)} "
            f"iterations, rate estimate {float(result.contraction):.4g}, curvature {result.curvature()}]; the result, "
            "with the input parameters, is in the exception's .result; pass throw=False to have it returned", result)
    failed = [i for i, ok in enumerate(np.asarray(result.converged).reshape(-1)) if not ok]
    reasons = result.reason()
    detail = "; ".join(f"request {i}: {reasons[i]}" for i in failed[:5]) + (" ..." if len(failed) > 5 else "")
    raise UnlearnError(f"{len(failed)} of {len(reasons)} unlearning requests failed: {detail}; the results are in "
                       "the exception's .result (failed requests hold the input parameters)", result)


def fixed_point_unlearn(objective: Objective, params: Params, snapshots: SnapshotState, x, y, forget, *,
            stats: cv.EKFAC | None = None, config: MiniConfig = MiniConfig(), throw: bool = True) -> UnlearnResult:
    """Remove the training examples ``forget`` (indices into ``x``/``y``) from a trained model.

    Args:
      objective: the training objective (model, per-example loss, L2).
      params: the trained parameters ``w*``.
      snapshots: the snapshot buffer from training; its newest entry must be ``(w*, grad G_D(w*))``
        (checked: a stale buffer is refused).
      x, y: the full training set the model was trained on (only removed rows are read by the
        fixed point; the refinement, if enabled, reads the rest).
      forget: 1-D integer indices to remove.
      stats: EKFAC statistics saved at training time (logistic regression).
      config: `MiniConfig`.
      throw: raise `UnlearnError` (carrying the result) when the request fails; with
        ``throw=False`` the failed result is returned (its ``params`` are the input parameters).

    Returns:
      An `UnlearnResult`. The parameters keep their dtype (float32 or float64, also under
      ``jax_enable_x64``).
    """
    n = _check_inputs(params, snapshots, x, y, stats)
    idx, mask = pad_request(forget, n, config.min_bucket)
    kind = resolve_curvature(objective, config, stats)
    res = solve_jit(objective, config, kind, params, snapshots.params, snapshots.grads, snapshots.count,
                     stats, jnp.asarray(x), jnp.asarray(y), jnp.asarray(idx), jnp.asarray(mask))
    if throw and not bool(res.converged):
        _throw(res, batch=False)
    return res


def fixed_point_unlearn_many(objective: Objective, params: Params, snapshots: SnapshotState, x, y, requests, *,
                 stats: cv.EKFAC | None = None, config: MiniConfig = MiniConfig(), throw: bool = False) -> UnlearnResult:
    """Solve several independent deletion requests in one vmapped call.

    Each request is padded to a common size bucket, and the number of requests to a power of two
    (with empty requests whose results are dropped), so a new number of requests within a bucket
    does not recompile. Leaves of the result have a leading axis of ``len(requests)``; a failed
    request holds the input parameters. With ``throw=True``, any failed request raises
    `UnlearnError` carrying the batched result.
    """
    n = _check_inputs(params, snapshots, x, y, stats)
    if len(requests) == 0:
        raise ValueError("no deletion requests given")
    padded = [pad_request(r, n, config.min_bucket) for r in requests]
    size = max(p[0].size for p in padded)
    count = bucket_size(len(padded), 1)
    idx = np.zeros((count, size), np.int32)
    mask = np.zeros((count, size), np.float32)  # padding requests: an empty mask, nothing removed
    for i, (pi, mi) in enumerate(padded):
        idx[i, : pi.size], mask[i, : mi.size] = pi, mi
    kind = resolve_curvature(objective, config, stats)
    res = _solve_many_jit(objective, config, kind, params, snapshots.params, snapshots.grads, snapshots.count,
                          stats, jnp.asarray(x), jnp.asarray(y), jnp.asarray(idx), jnp.asarray(mask))
    if count != len(padded):
        res = jax.tree.map(lambda a: a[: len(padded)], res)
    if throw and not bool(np.all(np.asarray(res.converged))):
        _throw(res, batch=True)
    return res
