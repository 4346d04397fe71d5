"""A certificate for an unlearned model: how far it can be from the exact retrained optimum.

With ``R`` removed and ``m`` examples kept, the remaining-data objective is
``F(w) = (1/m) sum_{i kept} l_i(w) + l2/2 ||M w||^2`` and retraining's ideal answer is its
minimiser ``w_R``. When every parameter is penalised (``M = I``), ``l2 > 0``, the model is linear
in its parameters and the per-example loss is convex in the model's output, ``F`` is
``mu``-strongly convex with ``mu = l2``. Then, for *any* parameters ``w``,

    mu ||w - w_R||^2 <= <grad F(w) - grad F(w_R), w - w_R> <= ||grad F(w)|| ||w - w_R||

(strong convexity, ``grad F(w_R) = 0``, Cauchy-Schwarz), so

    ||w - w_R|| <= ||grad F(w)|| / mu.

:func:`certify` computes ``grad F(w)`` exactly in one jitted pass over the training set (the
removed rows weighted 0) and returns that *bound* only when the objective qualifies; anything
else gets ``is_bound=False`` and the same figure as an *estimate* (no theorem backs it).

Conservative on purpose: an objective qualifies only if ``objective.kind == "logreg"`` (a single
dense layer on the inputs, see :class:`~mini_unlearn_jax.core.models.Objective`), its loss is one of
:data:`CONVEX_LOSSES` (softmax cross-entropy, squared error) by identity, ``l2 > 0`` and
``l2_mask`` selects every leaf (``make_objective(..., penalize_bias=True)``).

Floating point: by default the pass runs in float64 (``precision="float64"``, also without
``jax_enable_x64``; float32 data and parameters convert exactly), and the bound adds a
first-order allowance for the rounding of that pass (``round_off``: Higham's ``gamma_k`` times the
gradient built from absolute values). In float64 it is negligible; with ``precision="native"`` in
float32 on a large training set it can dominate near the optimum, and the bound then says so by
being loose rather than by being wrong.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .models import Objective, cross_entropy, squared_error

Params = Any

#: Per-example losses known to be convex in the model's output (checked by identity).
CONVEX_LOSSES = (cross_entropy, squared_error)
#: ``Objective.kind`` values whose model is linear (affine in the inputs, linear in the parameters).
LINEAR_KINDS = ("logreg",)


class Certificate(NamedTuple):
    """What :func:`certify` returns.

    Attributes:
      bound: when ``is_bound``, a guaranteed upper bound on ``||params - w_R||`` (``w_R`` the exact
        minimiser of the remaining-data objective), rounding of the pass included; else None.
      estimate: ``grad_norm / l2`` (None when ``l2 <= 0``): equal to the bound up to ``round_off``
        when ``is_bound``, otherwise a heuristic figure that no theorem backs.
      grad_norm: ``||grad F_{D\\R}(params)||`` as computed.
      mu: the strong-convexity modulus used (``l2``).
      is_bound: whether the objective qualifies (see ``reason``).
      reason: why it does or does not qualify.
      round_off: the allowance for floating-point rounding in ``grad_norm`` (0 when not a bound).
      dtype: the precision of the pass.
      n_kept: the number of remaining examples ``m``.
      time_s: the pass's run time (compiled), to be counted in the unlearning time.
      compile_s: its compilation time, apart.
    """

    bound: float | None
    estimate: float | None
    grad_norm: float
    mu: float
    is_bound: bool
    reason: str
    round_off: float
    dtype: str
    n_kept: int
    time_s: float
    compile_s: float


def qualifies(objective: Objective, params: Params) -> tuple[bool, str]:
    """Whether ``||grad F|| / l2`` is a theorem for this objective, and why (or why not)."""
    if not (np.isfinite(objective.l2) and objective.l2 > 0):
        return False, f"l2 = {objective.l2}: the objective is not strongly convex (needs l2 > 0)"
    mask = jax.tree.leaves(objective.l2_mask(params))
    if not all(bool(m) for m in mask):
        return False, ("L2 does not penalise every parameter (e.g. the bias): the objective is not strongly convex "
                       "in all of them; build it with make_objective(..., penalize_bias=True)")
    if objective.kind not in LINEAR_KINDS:
        return False, (f"model kind {objective.kind!r} is not known to be linear in its parameters: the objective "
                       "need not be convex")
    if not any(objective.example_loss is f for f in CONVEX_LOSSES):
        return False, ("the per-example loss is not one known to be convex (softmax cross-entropy or squared error "
                       "from mini_unlearn_jax.core.models)")
    return True, "l2-strongly convex: l2 on every parameter, a linear model and a convex loss"


def _gamma(k, u):
    """Higham's ``gamma_k = k u / (1 - k u)``: the relative rounding bound of a ``k``-term sum."""
    return k * u / (1.0 - k * u)


def _pass(objective: Objective, chunk: int, linear: bool, cdtype, params, x, y, keep):
    """``(sum_i keep_i grad l_i, abs-value rounding term, ...)`` in chunks of ``chunk`` rows."""
    n = x.shape[0]
    u = float(jnp.finfo(cdtype).eps) / 2
    p = jax.tree.map(lambda a: a.astype(cdtype), params)
    pabs = jax.tree.map(jnp.abs, p)
    n_chunks = n // chunk
    tail = n - n_chunks * chunk
    d_in = int(np.prod(x.shape[1:]))
    g_sum = _gamma(chunk + n_chunks + 2, u)  # a chunk's matmul, then the sequential sum of chunks
    g_logit = _gamma(d_in + 1, u)

    def piece(xc, yc, kc):
        xc = xc.astype(cdtype)
        kc = kc.astype(cdtype)
        if jnp.issubdtype(yc.dtype, jnp.floating):
            yc = yc.astype(cdtype)
        z, vjp = jax.vjp(lambda q: objective.apply_fn(q, xc), p)
        dz = jax.vmap(jax.grad(objective.example_loss))(z, yc) * kc[:, None]
        g = vjp(dz)[0]
        if not linear:
            return g, jax.tree.map(jnp.zeros_like, g)
        # rounding allowance (first order): the logits' error |x||W| + |b| times gamma, passed
        # through a loss whose output-Hessian rows sum to at most 1 (cross-entropy, squared error),
        # the loss gradient's own evaluation, and the sums over rows
        zabs = objective.apply_fn(pabs, jnp.abs(xc))
        c_out = z.shape[-1]
        err_dz = (g_logit * jnp.max(zabs, axis=-1, keepdims=True)
                  + _gamma(c_out + 8, u) * jnp.max(jnp.abs(dz), axis=-1, keepdims=True))
        weight = g_sum * jnp.abs(dz) + kc[:, None] * err_dz
        _, vjp_abs = jax.vjp(lambda q: objective.apply_fn(q, jnp.abs(xc)), p)
        return g, vjp_abs(weight)[0]

    def add(acc, new):
        return jax.tree.map(jnp.add, acc, new)

    zero = jax.tree.map(jnp.zeros_like, p)
    acc = (zero, zero)
    if n_chunks:
        def body(i, acc):
            start = i * chunk
            sl = lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk, 0)
            return add(acc, piece(sl(x), sl(y), sl(keep)))

        acc = jax.lax.fori_loop(0, n_chunks, body, acc)
    if tail:
        s = n_chunks * chunk
        acc = add(acc, piece(x[s:], y[s:], keep[s:]))
    g_data, a_data = acc
    m = jnp.sum(keep.astype(cdtype))
    mask = objective.l2_mask(p)
    l2 = objective.l2
    grad = jax.tree.map(lambda gd, w, mk: gd / m + (l2 * w if mk else 0.0), g_data, p, mask)
    absg = jax.tree.map(lambda ad, w, mk: ad / m + (_gamma(3, u) * l2 * jnp.abs(w) if mk else 0.0), a_data, p, mask)
    norm = lambda t: jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(t)))
    return norm(grad), norm(absg)


_pass_jit = jax.jit(_pass, static_argnums=(0, 1, 2, 3))


def certify(objective: Objective, params: Params, x, y, keep, *, chunk: int = 65536,
            precision: str = "float64") -> Certificate:
    """Certify ``params`` against the exact minimiser of the remaining-data objective.

    One exact pass over the training set (forward and backward, removed rows weighted 0).

    Args:
      objective: the training objective; a bound needs ``l2 > 0`` on every parameter, a linear
        model and a convex loss (see :func:`qualifies`), e.g.
        ``make_objective(LogisticRegression(C), l2, penalize_bias=True)``.
      params: the parameters to certify (e.g. an unlearned model).
      x, y: the full training set ``[n, ...]``, ``[n]``.
      keep: ``[n]`` 0/1 weights, 0 for the removed examples
        (``mini_unlearn_jax.core.methods.keep_mask(n, forget)``).
      chunk: rows per step of the pass.
      precision: ``"float64"`` (the default; exact conversion of float32 inputs, negligible
        rounding, also without ``jax_enable_x64``; falls back to the native dtype on TPUs) or
        ``"native"`` (the parameters' dtype, at least float32).

    Returns:
      A :class:`Certificate`; ``bound`` is set only when ``is_bound``.
    """
    if precision not in ("float64", "native"):
        raise ValueError(f"precision must be 'float64' or 'native', got {precision!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    n = int(np.shape(x)[0])
    keep_np = np.asarray(keep)
    if keep_np.shape != (n,) or np.shape(y)[0] != n:
        raise ValueError(f"keep must have shape ({n},) like y; got keep {keep_np.shape}, y {np.shape(y)}")
    if not np.all((keep_np == 0) | (keep_np == 1)):
        raise ValueError("keep must hold 0/1 weights (0 for a removed example)")
    n_kept = int(keep_np.sum())
    if n_kept < 1:
        raise ValueError("keep removes every example: there is no remaining-data objective")
    ok, reason = qualifies(objective, params)
    native = jnp.promote_types(jax.tree.leaves(params)[0].dtype, jnp.float32)
    use64 = precision == "float64" and jax.default_backend() != "tpu"
    cdtype = jnp.float64 if use64 else native
    args = (params, x, y, keep_np.astype(np.float32))
    with jax.enable_x64(bool(use64) or bool(jax.config.x64_enabled)), jax.default_matmul_precision("highest"):
        t0 = time.perf_counter()
        compiled = _pass_jit.lower(objective, min(chunk, n), ok, cdtype, *args).compile()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        gnorm, absg = jax.block_until_ready(compiled(*args))
        time_s = time.perf_counter() - t0
    gnorm, absg = float(gnorm), float(absg)
    mu = float(objective.l2)
    estimate = gnorm / mu if mu > 0 else None
    if ok and np.isfinite(gnorm) and np.isfinite(absg):
        u = float(jnp.finfo(cdtype).eps) / 2
        dim = sum(int(np.size(a)) for a in jax.tree.leaves(params))
        bound = (gnorm + absg) * (1.0 + _gamma(dim + 4, u)) / mu
        return Certificate(bound, estimate, gnorm, mu, True, reason, absg, jnp.dtype(cdtype).name, n_kept, time_s, compile_s)
    if ok:
        reason = "the gradient is not finite"
    return Certificate(None, estimate, gnorm, mu, False, reason, 0.0, jnp.dtype(cdtype).name, n_kept, time_s, compile_s)


def certify_removal(objective: Objective, params: Params, x, y, forget, **kw) -> Certificate:
    """:func:`certify` with the removed examples given as indices ``forget`` instead of ``keep``."""
    n = int(np.shape(x)[0])
    keep = np.ones(n, np.float32)
    keep[np.asarray(forget, dtype=np.int64)] = 0.0
    return certify(objective, params, x, y, keep, **kw)
