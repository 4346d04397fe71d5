"""Convex unlearning that reads only the removed examples: a stored quadratic model of the data.

For multinomial logistic regression (`Objective.kind == "logreg"`, softmax cross-entropy) with
`n` training examples the objective is `F_D(w) = (1/n) sum_i l_i(w) + (1/2) sum_j pen_j w_j^2`
(`pen = l2 * M`, `M` the L2 mask: the kernel, and the bias only under `penalize_bias=True`).
The parameters are handled as one flat vector `w = vec([kernel; bias])` of size
`d = (D + 1) C` (row-major `[D + 1, C]`, so index `j C + c`).

Training time (`fit_quadratic`, one pass over the data in chunks): at the trained model `w*`
the mean data loss `G(w*)`, the objective's gradient `g = grad F_D(w*)` and its Hessian

    H = (1/n) sum_i (x_i x_i^T) kron S_i + diag(pen),    S_i = diag(p_i) - p_i p_i^T,

with `x_i` the input with a 1 appended and `p_i` its softmax probabilities, built from the
`C (C + 1) / 2` class blocks `sum_i s_i^{ac} x_i x_i^T` (memory O(d^2), never `jax.hessian`),
and the inverse of the Cholesky factor `L` of `H + c u u^T`. The last term matters only when the
bias is unpenalised: the softmax is invariant to adding a constant to every class's bias, so
`u` (the unit vector of that shift) spans the null space of `H`; `c = trace(H) / d` makes the
factor exist and changes no solution (every gradient is orthogonal to `u`). The factor is kept
inverted (`L^{-1}`) because a preconditioner application is then two matrix-vector products
(`L^{-T} z` computed as `z^T L^{-1}`, which reads the matrix in its stored order), an order of
magnitude faster on CPUs than two triangular solves.

Unlearning time (`run`, the method `mini-exact`; the model below is `model="exact-removed"`): with `R` the `r` removed examples and
`m = n - r`, the remaining-data objective `F_R(w) = (1/m) sum_{i not in R} l_i(w) + pen-term`
is modelled, reading only `x[R], y[R]`, as

    F_R(w) ~ M(w) = ( n Q(w) - sum_{i in R} l_i(w) ) / m + (1/2) sum_j pen_j w_j^2,
    Q(w) = G(w*) + gd^T (w - w*) + (1/2) (w - w*)^T Hd (w - w*),

(`gd`, `Hd` the data parts of `g` and `H`): the full-data quadratic model minus the removed
examples' exact loss. Newton's method `w <- w - t A(w)^{-1} grad M(w)`, with
`A(w) = (n Hd - sum_{i in R} hess l_i(w)) / m + diag(pen)` (removed terms by `jax.linearize` over
the removed rows), each system solved by conjugate gradients preconditioned with the stored
factor and `t` from a backtracking line search on `M`, is one compiled program whose shapes
depend on the padded request size and `d` only, never on `n`. `model="quadratic"` replaces the
removed examples' exact loss by its second-order expansion at `w*` (then `M` is the exact
second-order expansion of `F_R` at `w*`: one exact Newton step from `w*` on the remaining data).

The answer is the minimiser of `M`, not of `F_R`: the model's error is the Taylor remainder of
the data's loss beyond second order around `w*`, which no computation over the removed examples
alone can measure. Precisely, with `q_i` the second-order expansion of `l_i` at `w*`,
`M - F_R = (1/m) sum_{all i} (q_i - l_i)` for `"exact-removed"`: the removed examples' own
remainders stay in it (their quadratic terms are in `Q`, their exact loss is what is
subtracted), while for `"quadratic"` `M - F_R = (1/m) sum_{i not in R} (q_i - l_i)`, the remaining
examples' remainders only. Where the remainders have the same sign (the usual case) the
`"quadratic"` model is the closer one (tests/test_quadratic.py measures both). The gap is large
where the removed examples are well fit at `w*` (small curvature there, as when `d` exceeds `n`):
their quadratic terms in `Q` are then nearly flat, so `M` rewards raising their exact loss almost
as gradient ascent does, and `"exact-removed"` overshoots retraining. Measured with
benchmarks/removed_only.py (relative parameter error to retraining, 10 % / 30 % removed): on the
first 2,000 Fashion-MNIST images (`--n 2000 --n-test 1000`, d = 7,850 > n) 1.27 / 1.28 for
`"exact-removed"`, farther than `w*` itself, its removed examples' loss ~1.9x retraining's, and
0.074 / 0.12 for `"quadratic"`; on 20,000 images 0.048 / 0.078 against 0.022 / 0.040. So
`"quadratic"` is `run`'s default. The reported `error_estimate` is an *estimate* of the distance to the
minimiser of `M` (from the last step norms), never a bound, and says nothing of that remainder.

The next request (`downdate`) subtracts the removed examples' terms at `w*` (their loss, gradient
and Hessian, and their count) and refactorises: the new state is the second-order expansion
around the *original* `w*` of the remaining data's objective. Its statistics stay evaluated at
the original `w*` and are never re-linearised at the unlearned model. Its sums run over the
remaining examples only, but `w*` itself is the original model, trained with the removed
examples: a downdated state remembers them as well as the original model does. It serves the
next request in memory; what an unlearned run stores must be the unlearned parameters, never
this state (re-expanding at the unlearned model would take the pass over the remaining data that
this method exists to avoid). Its cost is `~ r C (C + 1) / 2 (D + 1)^2` multiply-adds for the
removed Hessian plus the refactorisation (a Cholesky factorisation and a triangular inverse,
`~ d^3 / 2`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .aot import aot, timed
from .linalg import logreg_matrix, logreg_params, pcg
from .mini import pad_request, validate_indices
from .models import Objective, check_param_dtypes, cross_entropy
from .problem import MethodOutput, Problem

Params = Any

#: The largest parameter count `d` the stored model is built for: the state holds two `d x d`
#: matrices (the Hessian and its inverse Cholesky factor), 2 GiB in float32 and 4 GiB in float64
#: at `d = 16,384`, and fitting or refactorising holds about two more while it runs.
MAX_PARAMS = 16_384
#: Where a `Problem` carries the state: `problem.extras[STATE_KEY]`.
STATE_KEY = "quadratic"
_MIN_BUCKET = 64
_STATUS = {1: "converged", 2: "converged at the precision of the stored model (the steps stopped shrinking)",
           3: "the model's gradient or step became NaN/inf", 4: "no decrease of the model along the Newton step "
           "(the modelled remaining-data Hessian is not positive definite there)", 5: "hit the Newton step cap",
           6: "the model's objective rose"}


class QuadraticState(NamedTuple):
    """The remaining data's second-order expansion around `w_star` (see the module docstring).

    Attributes:
      w_star: `[d]` the flat parameters at which every statistic is evaluated.
      grad: `[d]` gradient of the objective at `w_star` (data mean plus penalty).
      hessian: `[d, d]` Hessian of the objective at `w_star`.
      chol_inv: `[d, d]` `L^{-1}`, `L` the lower Cholesky factor of `hessian + null_scale u u^T`.
      penalty: `[d]` the L2 coefficient on each parameter (`l2` or 0).
      null: `[d]` the unit null direction `u` (zeros when the bias is penalised).
      null_scale: `[]` `c`, its weight in the factor (0 when there is none).
      loss: `[]` the mean data loss at `w_star`.
      count: `[]` int32, the number of examples the statistics are means over.
    """

    w_star: jax.Array
    grad: jax.Array
    hessian: jax.Array
    chol_inv: jax.Array
    penalty: jax.Array
    null: jax.Array
    null_scale: jax.Array
    loss: jax.Array
    count: jax.Array


def flatten(params: Params) -> jax.Array:
    """`[d]` flat parameters `vec([kernel; bias])` (row-major) of a logistic regression."""
    return logreg_matrix(params).reshape(-1)


def unflatten(w: jax.Array, num_classes: int) -> Params:
    """The `{"Dense_0": {"kernel", "bias"}}` parameters of flat `w` (inverse of `flatten`)."""
    return logreg_params(w.reshape(-1, num_classes))


def param_count(params: Params) -> int:
    return int(sum(np.size(a) for a in jax.tree.leaves(params)))


def why_not(objective: Objective, params: Params) -> str | None:
    """Why the stored quadratic model does not apply to `objective` at `params` (None: it does)."""
    dense = params.get("Dense_0", {}) if isinstance(params, dict) else {}
    if (objective.kind != "logreg" or objective.example_loss is not cross_entropy or len(params) != 1
            or set(dense) != {"kernel", "bias"}):
        return ("it stores the closed-form Hessian of multinomial logistic regression (a single dense layer with "
                "softmax cross-entropy, Objective.kind == 'logreg'); this objective is "
                f"kind {objective.kind!r}" + ("" if objective.example_loss is cross_entropy else " with another loss"))
    if not (np.isfinite(objective.l2) and objective.l2 > 0):
        return f"l2 = {objective.l2}: the remaining-data objective must be strongly convex in the kernel (l2 > 0)"
    mask = objective.l2_mask(params)["Dense_0"]
    if not bool(mask["kernel"]):
        return "the L2 mask leaves the kernel unpenalised: the Hessian need not be invertible"
    d = param_count(params)
    if d > MAX_PARAMS:
        return (f"the model has d = {d:,} parameters, above MAX_PARAMS = {MAX_PARAMS:,} (the state holds two d x d "
                f"matrices: {2 * d * d * 4 / 2**30:.1f} GiB in float32); use mini or newton")
    return None


def needs(problem: Problem) -> str | None:
    """Why `mini-exact` does not apply to `problem` (None: it applies)."""
    why = why_not(problem.objective, problem.params)
    if why:
        return why
    state = problem.extras.get(STATE_KEY)
    if state is None:
        return (f"it reads the quadratic model fitted at training time, and problem.extras[{STATE_KEY!r}] is missing "
                "(fit it with quadratic.fit_quadratic(objective, params, x, y))")
    if state.w_star.shape != (param_count(problem.params),):
        return f"the stored model has {state.w_star.shape[0]} parameters, the problem's model {param_count(problem.params)}"
    if int(state.count) != int(problem.x.shape[0]):
        return (f"the stored model is over {int(state.count):,} examples but the problem has {int(problem.x.shape[0]):,}: "
                "downdate it with every removal (quadratic.refresh)")
    return None


# -- statistics in chunks ---------------------------------------------------------------------


def _with_bias(x):
    x = x.reshape((x.shape[0], -1))
    return jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)


def _chunk_terms(objective: Objective, num_classes: int, w, x, y, weight):
    """Weighted sums over one chunk of the loss, its gradient `[d]` and the Hessian's class blocks.

    Block row `a` is `[D + 1, (D + 1) (C - a)]`: `sum_i weight_i p_ia (delta_ac - p_ic) x_i x_i^T` for
    `c >= a`, which is block `(a, c)` of `sum_i weight_i (x_i x_i^T) kron S_i` (the others by symmetry).
    """
    params = unflatten(w, num_classes)
    s = lambda p: jnp.sum(weight * objective.losses(p, x, y))
    loss, g = jax.value_and_grad(s)(params)
    probs = jax.nn.softmax(objective.logits(params, x), axis=-1).astype(w.dtype)
    xb = _with_bias(x.astype(w.dtype))
    rows = []
    for a in range(num_classes):
        q = jnp.eye(num_classes, dtype=w.dtype)[a, a:] - probs[:, a:]  # delta_ac - p_c, c >= a
        left = xb * (weight * probs[:, a])[:, None]
        right = (xb[:, :, None] * q[:, None, :]).reshape(xb.shape[0], -1)
        rows.append(left.T @ right)
    return loss, flatten(g), rows


def _assemble(rows, num_classes: int) -> jax.Array:
    """The `[d, d]` matrix (flat index `j C + a`) from the block rows of `_chunk_terms`."""
    p = rows[0].shape[0]
    blocks = {}
    for a, row in enumerate(rows):
        row = row.reshape(p, p, num_classes - a)
        for c in range(a, num_classes):
            blocks[a, c] = row[:, :, c - a]
            blocks[c, a] = row[:, :, c - a].T
    grid = jnp.stack([jnp.stack([blocks[a, c] for c in range(num_classes)]) for a in range(num_classes)])
    return grid.transpose(2, 0, 3, 1).reshape(p * num_classes, p * num_classes)  # (j, a, k, c)


@functools.partial(jax.jit, static_argnames=("objective", "num_classes", "chunk"))
def _sums(objective: Objective, num_classes: int, chunk: int, w, x, y, weight):
    """Weighted sums over all rows (a multiple of `chunk`) of the loss, gradient and Hessian at `w`."""
    steps = x.shape[0] // chunk

    def body(i, acc):
        sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, 0)
        new = _chunk_terms(objective, num_classes, w, sl(x), sl(y), sl(weight))
        return jax.tree.map(jnp.add, acc, new)

    shapes = jax.eval_shape(lambda: _chunk_terms(objective, num_classes, w, x[:chunk], y[:chunk], weight[:chunk]))
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    loss, g, rows = jax.lax.fori_loop(0, steps, body, zero)
    return loss, g, _assemble(rows, num_classes)


def _factor(hessian, null, null_scale):
    """`L^{-1}` for `L L^T = hessian + null_scale u u^T` (NaN where it is not positive definite)."""
    chol = jnp.linalg.cholesky(hessian + null_scale * jnp.outer(null, null))
    eye = jnp.eye(hessian.shape[0], dtype=hessian.dtype)
    return jax.lax.linalg.triangular_solve(chol, eye, left_side=True, lower=True)


def _pad(x, y, weight, chunk):
    extra = (-x.shape[0]) % chunk
    if not extra:
        return x, y, weight
    pad = lambda a: jnp.concatenate([a, jnp.zeros((extra,) + a.shape[1:], a.dtype)])
    return pad(x), pad(y), pad(weight)


def _penalty_and_null(objective: Objective, params: Params, dtype):
    mask = objective.l2_mask(params)["Dense_0"]
    kernel, bias = params["Dense_0"]["kernel"], params["Dense_0"]["bias"]
    rows = jnp.concatenate([jnp.full(kernel.shape, bool(mask["kernel"])), jnp.full((1, bias.shape[0]), bool(mask["bias"]))])
    pen = objective.l2 * rows.reshape(-1).astype(dtype)
    null = jnp.zeros(rows.shape, dtype)
    if not bool(mask["bias"]):  # the softmax's shift invariance of an unpenalised bias
        null = null.at[-1].set(jnp.asarray(1.0 / np.sqrt(bias.shape[0]), dtype))
    return pen, null.reshape(-1)


def fit_quadratic(objective: Objective, params: Params, x, y, *, chunk: int = 2048,
                  dtype=None) -> QuadraticState:
    """The stored model at the trained parameters `params` over the training set `x, y`.

    One pass over the data in chunks of `chunk` rows (`~ n C (C + 1) / 2 (D + 1)^2`
    multiply-adds), a Cholesky factorisation and a triangular inverse.

    Args:
      objective: a logistic-regression objective (see `why_not`).
      params: the trained parameters `w*`.
      x, y: the training set `[n, ...]`, `[n]`.
      chunk: rows per step of the pass.
      dtype: the statistics' dtype (default the parameters'; float64 needs `jax_enable_x64`).

    Returns:
      A `QuadraticState` with `count = n`; put it in `problem.extras[STATE_KEY]`.
    """
    check_param_dtypes(params, "fit_quadratic: the parameters")
    why = why_not(objective, params)
    if why:
        raise ValueError(f"fit_quadratic does not apply: {why}")
    dt = jnp.dtype(dtype or jax.tree.leaves(params)[0].dtype)
    n = int(np.shape(x)[0])
    num_classes = int(params["Dense_0"]["bias"].shape[0])
    w = flatten(params).astype(dt)
    chunk = max(1, min(int(chunk), n))
    xs, ys, ws = _pad(jnp.asarray(x), jnp.asarray(y), jnp.ones((n,), dt), chunk)
    loss, g, h = _sums(objective, num_classes, chunk, w, xs, ys, ws)
    pen, null = _penalty_and_null(objective, params, dt)
    hessian = h / n + jnp.diag(pen)
    scale = jnp.where(jnp.any(null != 0), jnp.trace(hessian) / hessian.shape[0], 0.0).astype(dt)
    chol_inv = jax.jit(_factor)(hessian, null, scale)
    if not bool(jnp.all(jnp.isfinite(chol_inv))):
        raise ValueError("fit_quadratic: the Hessian is not positive definite (or not finite) at these parameters")
    return QuadraticState(w, g / n + pen * w, hessian, chol_inv, pen, null, scale, (loss / n).astype(dt),
                          jnp.asarray(n, jnp.int32))


# -- the downdate -------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("objective", "num_classes", "chunk", "refactor"))
def _downdate(objective: Objective, num_classes: int, chunk: int, refactor: bool, state: QuadraticState, xf, yf, mask):
    loss_r, g_r, h_r = _sums(objective, num_classes, chunk, state.w_star, xf, yf, mask.astype(state.w_star.dtype))
    n = state.count.astype(state.w_star.dtype)
    m = n - jnp.sum(mask).astype(n.dtype)
    pen = state.penalty
    hessian = (n / m) * state.hessian - h_r / m
    hessian = hessian + jnp.diag((1.0 - n / m) * pen)  # the penalty is not a mean over examples
    grad = (n * (state.grad - pen * state.w_star) - g_r) / m + pen * state.w_star
    chol_inv = _factor(hessian, state.null, state.null_scale) if refactor else state.chol_inv
    return state._replace(grad=grad, hessian=hessian, chol_inv=chol_inv, loss=(n * state.loss - loss_r) / m,
                          count=state.count - jnp.sum(mask).astype(jnp.int32))


def _gather_padded(x, y, forget, n, min_bucket=_MIN_BUCKET):
    idx, mask = pad_request(forget, n, min_bucket)
    dyn = (x, y, jnp.asarray(idx))
    exe, c = aot(_gather_jit, (), dyn)
    (xf, yf), t = timed(exe, *dyn)
    return xf, yf, jnp.asarray(mask), t, c


@jax.jit
def _gather_jit(x, y, idx):
    return x[idx], y[idx]


def downdate_padded(state: QuadraticState, objective: Objective, xf, yf, mask, *, refactor: bool = True,
                    chunk: int = 1024) -> tuple[QuadraticState, float, float]:
    """`downdate` on removed rows padded to a fixed size (`mask` 1 on real rows); returns the new
    state with the run time and the compile time (0 when this shape was compiled before)."""
    bucket = int(xf.shape[0])
    chunk = max(1, min(chunk, bucket))
    while bucket % chunk:
        chunk //= 2
    num_classes = int(state.w_star.shape[0] // (int(np.prod(xf.shape[1:])) + 1))
    dyn = (state, xf, yf, mask)
    exe, c = aot(_downdate, (objective, num_classes, chunk, bool(refactor)), dyn)
    new, t = timed(exe, *dyn)
    if refactor and not bool(jnp.all(jnp.isfinite(new.chol_inv))):
        raise ValueError("downdate: the remaining-data Hessian at w* is not positive definite (or not finite)")
    return new, t, c


def downdate(state: QuadraticState, objective: Objective, x_forget, y_forget, *, refactor: bool = True) -> QuadraticState:
    """The state after removing the examples `x_forget, y_forget` (rows of the data the state is over).

    Subtracts their loss, gradient and Hessian at `w_star` and their count, and (with
    `refactor`) refactorises. The statistics stay evaluated at the original `w_star`: the new
    state is the second-order expansion around `w_star` of the remaining data's objective, and
    holds nothing else computed over the removed examples. `refactor=False` keeps the previous
    factor as the preconditioner (the solution is unchanged; conjugate gradients may need more
    steps) and skips the `~ d^3 / 2` refactorisation.
    """
    r = int(np.shape(x_forget)[0])
    if not 0 < r < int(state.count):
        raise ValueError(f"downdate: remove between 1 and {int(state.count) - 1} examples, got {r}")
    idx, mask = pad_request(np.arange(r), r + 1, _MIN_BUCKET)
    xf, yf = jnp.asarray(x_forget)[idx], jnp.asarray(y_forget)[idx]
    return downdate_padded(state, objective, xf, yf, jnp.asarray(mask), refactor=refactor)[0]


class Refresh(NamedTuple):
    """What `refresh` returns: the downdated state and what it cost (compilation apart)."""

    state: QuadraticState
    time_s: float
    compile_s: float


def refresh(problem: Problem, forget, *, refactor: bool = True) -> Refresh:
    """The state for the next request after removing training indices `forget` from `problem`
    (reads only those rows): what `methods.refresh_for_next_request` stores in
    `extras[STATE_KEY]` of the next problem (whose data are the remaining rows)."""
    n = int(problem.x.shape[0])
    xf, yf, mask, t_g, c_g = _gather_padded(problem.x, problem.y, validate_indices(forget, n), n)
    state, t, c = downdate_padded(problem.extras[STATE_KEY], problem.objective, xf, yf, mask, refactor=refactor)
    return Refresh(state, t + t_g, c + c_g)


# -- the solve ----------------------------------------------------------------------------------


class _Loop(NamedTuple):
    w: jax.Array
    f: jax.Array
    k: jax.Array
    step: jax.Array
    prev: jax.Array
    status: jax.Array
    products: jax.Array
    cg_res: jax.Array


@functools.partial(jax.jit, static_argnames=("objective", "num_classes", "model", "max_iter", "cg_iters",
                                             "tol", "cg_rtol"))
def _solve(objective: Objective, num_classes: int, model: str, max_iter: int, cg_iters: int, tol: float,
           cg_rtol: float, state: QuadraticState, w0, xf, yf, mask):
    dt = state.w_star.dtype
    eps = jnp.finfo(dt).eps
    w0 = w0.astype(dt)
    n = state.count.astype(dt)
    m = n - jnp.sum(mask).astype(dt)
    pen, u, c = state.penalty, state.null, state.null_scale
    ws, H, Li = state.w_star, state.hessian, state.chol_inv
    gd = state.grad - pen * ws
    hd = lambda v: H @ v - pen * v
    s_rem = lambda w: jnp.sum(mask.astype(dt) * objective.losses(unflatten(w, num_classes), xf, yf).astype(dt))
    if model == "quadratic":  # the removed examples' second-order expansion at w*
        s0, g0 = jax.value_and_grad(s_rem)(ws)
        b0 = lambda v: jax.jvp(jax.grad(s_rem), (ws,), (v,))[1]
        rem_value = lambda w: s0 + g0 @ (w - ws) + 0.5 * (w - ws) @ b0(w - ws)
        rem_grad = lambda w: (g0 + b0(w - ws), b0)
    else:
        rem_value = s_rem
        rem_grad = lambda w: jax.linearize(jax.grad(s_rem), w)

    def value(w):
        e = w - ws
        sr = rem_value(w)
        big = jnp.abs(n * state.loss) + jnp.abs(sr) + n * jnp.abs(gd @ e)
        val = (n * (state.loss + gd @ e + 0.5 * e @ hd(e)) - sr) / m + 0.5 * jnp.sum(pen * w * w)
        return val, 64 * eps * (big / m + jnp.abs(val))  # the value and its rounding allowance

    def grad_and_hvp(w):
        gr, hr = rem_grad(w)
        g = (n * (gd + hd(w - ws)) - gr) / m + pen * w
        return g, lambda v: (n * hd(v) - hr(v)) / m + pen * v + c * u * (u @ v)

    # L^{-T} (L^{-1} v), the outer product written v^T L^{-1}: XLA on CPU materialises the transpose
    # of `Li.T @ z` in every application (~7x a matrix-vector product at d = 7,850), not that of `z @ Li`
    precond = lambda v: (Li @ v) @ Li
    floor = lambda w: 16 * eps * (jnp.linalg.norm(w) + 1.0)

    def body(s: _Loop) -> _Loop:
        g, A = grad_and_hvp(s.w)
        p, res, used = pcg(A, -g, jnp.zeros_like(g), precond, cg_iters, cg_rtol)
        gp = g @ p
        ok = jnp.all(jnp.isfinite(p)) & jnp.isfinite(gp)

        def cond(ls):
            t, f_new, _, done = ls
            return ~done & (t > 2.0**-12)

        def halve(ls):
            t = ls[0] * 0.5
            f_new, err = value(s.w + t * p)
            return t, f_new, err, f_new <= s.f + 1e-4 * t * gp + err

        f1, err1 = value(s.w + p)
        t, f_new, _, accepted = jax.lax.while_loop(cond, halve, (jnp.asarray(1.0, dt), f1, err1,
                                                                 f1 <= s.f + 1e-4 * gp + err1))
        w_new = s.w + t * p
        step = t * jnp.linalg.norm(p)
        disp = jnp.linalg.norm(w_new - w0)
        tiny = step <= jnp.maximum(tol * disp, floor(w_new))
        stalled = (s.k >= 1) & (step >= 0.5 * s.step) & (step <= jnp.sqrt(tol) * disp)
        status = jnp.where(~ok | ~jnp.isfinite(f_new), 3,
                           jnp.where(tiny | (~accepted & (jnp.linalg.norm(p) <= floor(s.w))), 1,
                                     jnp.where(~accepted, 4, jnp.where(stalled, 2, 0))))
        status = jnp.where((status == 0) & (s.k + 1 >= max_iter), 5, status)
        keep = (status <= 2) & accepted
        return _Loop(jnp.where(keep, w_new, s.w), jnp.where(keep, f_new, s.f), s.k + 1, jnp.where(keep, step, s.step),
                     jnp.where(keep, s.step, s.prev), status.astype(jnp.int32), s.products + used, res)

    f0, _ = value(w0)
    inf = jnp.asarray(jnp.inf, dt)
    out = jax.lax.while_loop(lambda s: s.status == 0, body,
                             _Loop(w0, f0, jnp.int32(0), inf, inf, jnp.int32(0), jnp.int32(0), inf))
    g_end, _ = grad_and_hvp(out.w)
    g_start, _ = grad_and_hvp(w0)
    status = jnp.where((out.status <= 2) & ~(out.f <= f0 + value(w0)[1]), 6, out.status)
    return out._replace(status=status), jnp.linalg.norm(g_start), jnp.linalg.norm(g_end), f0


def run(problem: Problem, forget, *, model: str = "quadratic", max_iter: int = 20, cg_iters: int = 40,
        tol: float = 1e-4, cg_rtol: float = 1e-5, min_bucket: int = _MIN_BUCKET) -> MethodOutput:
    """`mini-exact`: unlearn `forget` from `problem` reading only those rows and the stored model.

    Args:
      problem: carries the state in `problem.extras[STATE_KEY]` (see `fit_quadratic`, `refresh`);
        the iteration starts from `problem.params`.
      forget: training indices to remove (padded to a power-of-two bucket of at least
        `min_bucket` rows, so a request of a similar size reuses the compiled program).
      model: `"quadratic"` (the default: the removed examples' second-order expansion at `w_star`, so
        the answer is one exact Newton step on the remaining data from `w_star`) or `"exact-removed"`
        (their exact loss; farther from retraining where they are well fit, see the module docstring).
      max_iter: the Newton step cap; cg_iters, cg_rtol: each inner solve's budget and tolerance.
      tol: converged when a step is at most `tol` times the distance moved from the start.

    Returns:
      A `MethodOutput`; `time_s` counts gathering the removed rows and the compiled solve. When not
      converged (NaN/inf, no decrease, the step cap, a risen objective) `params` is `problem.params`.
    """
    if model not in ("exact-removed", "quadratic"):
        raise ValueError(f"model must be 'exact-removed' or 'quadratic', got {model!r}")
    why = needs(problem)  # run_method checks this too; a direct call must not run on a stale state
    if why:
        raise ValueError(f"mini-exact does not apply to this problem: {why}")
    state: QuadraticState = problem.extras[STATE_KEY]
    n = int(problem.x.shape[0])
    num_classes = int(problem.params["Dense_0"]["bias"].shape[0])
    xf, yf, mask, t_g, c_g = _gather_padded(problem.x, problem.y, forget, n, min_bucket)
    dyn = (state, flatten(problem.params), xf, yf, mask)
    exe, c = aot(_solve, (problem.objective, num_classes, model, max_iter, cg_iters, float(tol), float(cg_rtol)), dyn)
    (loop, g0, g1, f0), t = timed(exe, *dyn)
    code = int(loop.status)
    ok = code in (1, 2)
    dtype = jax.tree.leaves(problem.params)[0].dtype
    params = jax.tree.map(lambda a: a.astype(dtype), unflatten(loop.w, num_classes)) if ok else problem.params
    if ok and problem.objective.canonicalize is not None:
        params = problem.objective.canonicalize(params)
    k, step, prev = int(loop.k), float(loop.step), float(loop.prev)
    q = step / prev if k >= 2 and np.isfinite(prev) and prev > 0 else float("nan")
    estimate = q / (1.0 - q) * step if np.isfinite(q) and q < 1 else step  # an estimate, never a bound
    info = {"solver": "mini-exact", "model": model, "status": _STATUS.get(code, "unknown"), "iterations": k,
            "step_norm": step, "rate": q, "error_estimate": estimate if ok else float("nan"),
            "model_grad_norm": float(g1), "model_grad_norm_start": float(g0), "model_value": float(loop.f),
            "model_value_start": float(f0), "cg_products": int(loop.products), "cg_residual": float(loop.cg_res),
            "removed": int(np.size(forget)), "bucket": int(xf.shape[0]), "gather_s": t_g, "state_count": int(state.count)}
    reason = _STATUS.get(code, "unknown")
    if not ok:
        reason += "; the input parameters are returned"
    return MethodOutput(params, ok, reason, t + t_g, c + c_g, info)


def _run(problem: Problem, forget, **options) -> MethodOutput:
    return run(problem, forget, **options)


def _register():
    from .registry import METHODS, register_method

    if "mini-exact" not in METHODS:
        register_method("mini-exact", _run, needs=needs, family="convex", paper="",
                        summary="one exact Newton step on the remaining data from a stored d x d model of the "
                                "full data, reading only the removed rows (logistic regression; never chosen "
                                "automatically: docs/method.md section 3.7)",
                        cost="one pass over the removed examples and d x d work on the stored factor")


_register()
__all__ = ["MAX_PARAMS", "STATE_KEY", "QuadraticState", "Refresh", "downdate", "downdate_padded", "fit_quadratic",
           "flatten", "needs", "refresh", "run", "unflatten", "why_not"]
