"""The curvature models of the Mini-Unlearning fixed point: which one runs, and how it is built.

The fixed point of `core/mini.py` iterates `Phi(w) = w - P^{-1} g_R(w)`, where `g_R` is the
remaining-data gradient modelled from the full-data gradient `g* = grad G_D(w*)` at the trained
parameters (identity I1 of docs/method.md),

    g_R(w) = [ n (g* + B (w - w*)) - sum_{i in R} grad l_i(w) ] / (n - r) + l2 * M w,

for `r` removed examples `R` of `n` and the L2 mask `M`. A curvature path supplies the
preconditioner `P^{-1}` and the curvature model (`MiniConfig.curvature`; the result's
`stats.curvature` says which path ran, an index into `CURVATURES`):

- `ekfac` (logistic regression with the plain softmax cross-entropy; the default there): the
  removed examples' gradient is taken once, at `w*`, and `g_R` is modelled as affine,
  `g_R(w*) + K (w - w*)` with `K` the EKFAC model of the *remaining* Hessian (full statistics
  minus the removed examples' exact terms, positive semi-definite at any ratio; above
  `MiniConfig.precond_sample` removed examples their sum is estimated from that many) and
  `P = K + l2 I` (`ekfac_model`). The fixed point is therefore a linear preconditioned iteration
  on that model; it reads neither the data nor the removed examples after its first evaluation.
  The fidelity comes from the exact refinement passes.
- `lbfgs`: `B` the compact L-BFGS product from the buffer's secant pairs (DeltaGrad's model),
  `P = L I` with `L` from power iteration (`secant_model`); each iteration evaluates the removed
  examples' gradient at the iterate (one backward pass of the masked loss per fixed-size chunk).
  Known to expand at high ratios; the solver's guard reports it.
- `exact`: `B` is the exact Gauss-Newton product over the training set at `w*` (one data pass
  per iteration, `POWER_ITERATIONS` more for the power iteration), `P = L I` (`secant_model`).
  For small problems and tests.

`resolve_curvature` picks the path from the objective, the options and the EKFAC statistics.
The numerical pieces (EKFAC, compact L-BFGS, power iteration) are in `core/linalg.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from . import linalg as cv
from .models import Objective, cross_entropy

CURVATURES = ("ekfac", "lbfgs", "exact")
POWER_ITERATIONS = 31  # power-iteration steps for the step size L of the lbfgs and exact paths

Vec = Callable[[jax.Array], jax.Array]


def _is_softmax_cross_entropy(objective: Objective, num_classes: int) -> bool:
    """Whether the objective's per-example loss is the plain softmax cross-entropy that the EKFAC
    model assumes (checked on a few random logits when it is not `models.cross_entropy`)."""
    if objective.example_loss is cross_entropy:
        return True
    rng = np.random.default_rng(0)
    z = (3.0 * rng.normal(size=(4, num_classes))).astype(np.float32)
    t = rng.integers(0, num_classes, size=4)
    want = np.log(np.sum(np.exp(z), axis=1)) - z[np.arange(4), t]
    try:
        got = np.asarray(jax.vmap(objective.example_loss)(jnp.asarray(z), jnp.asarray(t, jnp.int32)), np.float64)
    except Exception:  # a loss that does not take integer labels is not this loss
        return False
    return got.shape == want.shape and bool(np.allclose(got, want, rtol=1e-4, atol=1e-5))


def resolve_curvature(objective: Objective, cfg, stats) -> str:
    """The curvature path that runs for ``cfg`` (a `MiniConfig`): ``ekfac``, ``lbfgs`` or ``exact``.

    ``auto`` picks ``ekfac`` for logistic regression with the plain softmax cross-entropy and
    EKFAC statistics, ``lbfgs`` otherwise. Raises ValueError when ``ekfac`` is asked for and
    does not fit the objective.
    """
    kind = cfg.curvature
    ekfac_fits = (objective.kind == "logreg" and stats is not None
                  and _is_softmax_cross_entropy(objective, int(np.shape(stats.UG)[0])))
    if kind == "auto":
        kind = "ekfac" if ekfac_fits else "lbfgs"
    if kind == "ekfac" and (objective.kind != "logreg" or stats is None):
        raise ValueError("curvature='ekfac' needs a logistic-regression model and its EKFAC statistics "
                         "(saved by training); use curvature='lbfgs' or 'exact' for other models")
    if kind == "ekfac" and not ekfac_fits:
        raise ValueError("curvature='ekfac' models the Hessian of the plain softmax cross-entropy, and this "
                         "objective's per-example loss differs from it (e.g. label smoothing); use "
                         "curvature='lbfgs' or 'exact' (curvature='auto' picks lbfgs for it)")
    return kind



def _removed_ekfac_sum(stats: cv.EKFAC, xr, probs_r, mask, sample: int):
    """Sum of the removed examples' exact EKFAC diagonal terms (cost ``r (d+1)^2``), or, when the
    padded request holds more than ``sample`` rows (``sample > 0``), its estimate from ``sample``
    of them spread evenly over the real (mask 1) rows, scaled by ``r / (their mask sum)``. It only
    shapes the preconditioner and the start (the refinement's residual is exact)."""
    size = xr.shape[0]
    if sample <= 0 or size <= sample:
        return cv.ekfac_removed_sum(stats, xr, probs_r, mask)
    r = jnp.sum(mask)
    real_first = jnp.argsort(-mask, stable=True)  # real rows first, in their order
    pos = jnp.floor((jnp.arange(sample, dtype=mask.dtype) + 0.5) * r / sample).astype(jnp.int32)
    sel = real_first[jnp.clip(pos, 0, size - 1)]
    ms = mask[sel]
    part = cv.ekfac_removed_sum(stats, xr[sel], probs_r[sel], ms)
    return part * (r / jnp.maximum(jnp.sum(ms), 1.0))



def ekfac_model(objective: Objective, cfg, stats: cv.EKFAC, params, unravel, m_vec, xr, mask, n, nr) -> tuple[Vec, Vec]:
    """``(P^{-1}, K)`` of the EKFAC path, as products with flat parameter vectors.

    ``K v`` is the EKFAC model of the remaining-data Hessian plus ``l2 M v``: the full statistics
    ``n * stats.diag`` minus the removed examples' exact terms (`_removed_ekfac_sum`), over
    ``nr = n - r``, clipped at 0 so it stays positive semi-definite; ``P = K + (l2 + damping) I``
    (``cfg`` is a `MiniConfig`). ``xr`` and ``mask`` are the padded removed rows and their 0/1 mask.
    """
    l2 = objective.l2
    probs_r = jax.nn.softmax(objective.apply_fn(params, xr), axis=-1)
    diag_rem = jnp.maximum(n * stats.diag - _removed_ekfac_sum(stats, xr, probs_r, mask, cfg.precond_sample), 0.0) / nr
    to_mat = lambda v: cv.logreg_matrix(unravel(v))
    to_vec = lambda m_: ravel_pytree(cv.logreg_params(m_))[0]
    precond = lambda v: to_vec(cv.ekfac_solve(stats, diag_rem, l2 + cfg.damping, to_mat(v)))
    # Removed examples enter through the same EKFAC model as the full data (their exact
    # gradient at w*, their exact EKFAC terms for curvature): the model Hessian is then
    # the PSD remaining-data EKFAC, never approximate-minus-exact, and g_R is affine.
    K_rem = lambda v: to_vec(cv.ekfac_product(stats, diag_rem, to_mat(v))) + l2 * m_vec * v
    return precond, K_rem


def secant_model(kind: str, objective: Objective, cfg, params, unravel, w0, x, y, S_all, G_all, snap_count,
                 n, nr) -> tuple[Vec, Vec, int]:
    """``(B, P^{-1}, passes per B)`` of the ``lbfgs`` or ``exact`` path (``cfg`` a `MiniConfig`).

    ``B`` models the full-data Hessian: the compact L-BFGS product from the snapshot buffer's
    secant pairs (rows ``S_all`` / ``G_all`` of flat parameters and gradients, ``snap_count``
    written; no data pass) or the exact Gauss-Newton product over ``x``, ``y`` at ``w0`` (one data
    pass). ``P = L I`` with ``L = (n / nr) max(lambda_max(B), 0) + l2 + damping``, ``lambda_max``
    from `POWER_ITERATIONS` steps of power iteration (``L = 1`` if that is not finite and positive).
    """
    dtype = w0.dtype
    passes_per_B = 0
    if kind == "lbfgs":
        # rows oldest -> newest
        K = S_all.shape[0]
        order = (jnp.arange(K) + snap_count) % K
        S, Y, pair_ok = cv.secant_pairs(S_all[order], G_all[order], snap_count)
        B = lambda v: cv.lbfgs_product(S, Y, v, pair_ok)
    else:
        keep_all = jnp.ones((n,), dtype)
        B = lambda v: ravel_pytree(cv.ggn_vp(objective, params, x, y, keep_all, unravel(v)))[0]
        passes_per_B = 1

    v0 = jax.random.normal(jax.random.key(0), w0.shape, dtype)
    lmax = cv.top_eigenvalue(B, v0, POWER_ITERATIONS)
    L = (n / nr) * jnp.maximum(lmax, 0.0) + objective.l2 + cfg.damping
    L = jnp.where(jnp.isfinite(L) & (L > 0), L, 1.0)
    precond = lambda v: v / L
    return B, precond, passes_per_B
