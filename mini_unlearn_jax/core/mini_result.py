"""What a Mini-Unlearning solve returns: result codes, their messages, statistics and the error.

A solve of `mini.fixed_point_unlearn` ends with one integer result code per request
(`UnlearnResult.status`), in optimistix's shape `Solution(value, result, stats)`:

| code | name | success | meaning |
|---|---|---|---|
| `CONVERGED` | `converged` | yes | the step norm fell to `MiniConfig.tol` times the parameters' scale |
| `AT_RESOLUTION` | `at_resolution` | yes | the step reached the dtype's resolution and stopped shrinking |
| `REFINE_NO_PROGRESS` | `refine_no_progress` | yes | converged; the refinement did not help and was dropped |
| `REFINE_ROSE` | `refine_rose` | yes | converged; the refined point raised the remaining-data objective |
| `MAX_ITER` | `max_iter` | no | step cap reached, steps still shrinking (or too few to tell) |
| `NOT_CONTRACTING` | `not_contracting` | no | step cap reached, rate estimate `q >= 1` |
| `EXPANDING` | `expanding` | no | the step norms grew for several iterations in a row |
| `NONFINITE` | `nonfinite` | no | NaN/inf appeared in the iteration |
| `REFINE_FAILED` | `refine_failed` | no | neither the refined nor the fixed-point iterate beats not moving |

The rules that set them are in the docstring of `core/mini.py` (and docs/method.md). A
request that does not succeed holds its input parameters bit for bit. Every message works per
element of a batched (vmapped) result: `UnlearnResult.reason()` gives one string for a single
request and a list for a batch. `UnlearnError` carries the result when a caller asked for an
exception (`throw=True`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from .mini_curvature import CURVATURES

Params = Any

CONVERGED, MAX_ITER, EXPANDING, NONFINITE, REFINE_FAILED = 0, 1, 2, 3, 4
NOT_CONTRACTING, AT_RESOLUTION, REFINE_NO_PROGRESS, REFINE_ROSE = 5, 6, 7, 8
SUCCESS = (CONVERGED, AT_RESOLUTION, REFINE_NO_PROGRESS, REFINE_ROSE)
STATUS_NAMES = {
    CONVERGED: "converged", MAX_ITER: "max_iter", EXPANDING: "expanding", NONFINITE: "nonfinite",
    REFINE_FAILED: "refine_failed", NOT_CONTRACTING: "not_contracting", AT_RESOLUTION: "at_resolution",
    REFINE_NO_PROGRESS: "refine_no_progress", REFINE_ROSE: "refine_rose",
}
REASONS = {
    CONVERGED: "converged",
    MAX_ITER: "step cap reached before the step norm fell below the tolerance (the steps were still shrinking, "
              "or too few steps to tell); the original parameters are returned",
    EXPANDING: "the map is not contractive here (the step norms grew for several iterations in a row); "
               "the original parameters are returned",
    NONFINITE: "NaN/inf appeared in the iteration; the original parameters are returned",
    REFINE_FAILED: "the refinement did not reduce the exact residual (relative residual >= 1 or NaN) and neither "
                   "did the fixed-point iterate: both look worse than not moving; the original parameters are "
                   "returned",
    NOT_CONTRACTING: "step cap reached and the steps were not shrinking (rate estimate >= 1 over the last "
                     "steps): the map is not contractive here; the original parameters are returned",
    AT_RESOLUTION: "converged to the resolution of the dtype (round-off stalled the steps before the tolerance)",
    REFINE_NO_PROGRESS: "converged; the refinement did not reduce the exact residual (relative residual >= 1 or "
                        "NaN), so the fixed-point iterate is returned without it",
    REFINE_ROSE: "converged; the refinement's step raised the remaining-data objective above the fixed-point "
                 "iterate's (its linear model does not hold that far, e.g. on a non-convex model), so the "
                 "fixed-point iterate is returned without it",
}


class UnlearnStats(NamedTuple):
    """Statistics of a solve (leaves gain a leading axis in `fixed_point_unlearn_many`).

    Attributes:
      iterations: fixed-point iterations made.
      data_passes: passes over the training data made: the refinement's products over the
        remaining data, plus, for ``curvature='exact'``, one full-data product per iteration and
        31 for the power iteration. The removed examples' own passes are not counted.
      rate: the rate estimate ``q``: geometric mean of the last ``rate_ratios`` step-norm ratios;
        NaN when fewer than 2 ratios exist (e.g. a first-step exit).
      rate_ratios: how many ratios ``rate`` averages (0 to 4).
      step_norm: the last fixed-point step norm ``||w_k - w_{k-1}||``.
      min_step_norm: the smallest step norm seen.
      fixed_point_residual: relative residual ``||H d_fp + g_R(w*)|| / ||g_R(w*)||`` of the
        fixed-point iterate on the exact linearised problem (NaN without refinement).
      refine_residual: the same for the refined iterate (NaN without refinement).
      refine_passes: data passes the refinement made (at most ``MiniConfig.refine_passes``).
      curvature: the curvature path that ran, an index into `CURVATURES`.
    """

    iterations: jax.Array
    data_passes: jax.Array
    rate: jax.Array
    rate_ratios: jax.Array
    step_norm: jax.Array
    min_step_norm: jax.Array
    fixed_point_residual: jax.Array
    refine_residual: jax.Array
    refine_passes: jax.Array
    curvature: jax.Array


def _per_request(table, codes) -> str | list[str]:
    """``table[code]`` for a single result's code, or a list with one entry per batched request."""
    codes = np.asarray(codes)
    if codes.ndim == 0:
        return table[int(codes)]
    return [table[int(c)] for c in codes.reshape(-1)]


class UnlearnResult(NamedTuple):
    """What `fixed_point_unlearn` returns (leaves gain a leading axis in `fixed_point_unlearn_many`).

    In optimistix's shape: the answer (``params``, also ``value``), a result code (``status``,
    also ``result``; `reason` gives its message, one per request for a batch) and
    `UnlearnStats` (``stats``). The other fields are kept for existing callers.

    ``params`` are the unlearned parameters when ``converged`` (the status is one of
    `SUCCESS`); otherwise they are the input parameters, bit for bit (never the diverged
    iterate). ``contraction`` is the rate *estimate* ``q`` (``stats.rate``; NaN before 2 step
    ratios exist) and ``error_estimate = q/(1-q) * step_norm`` an a-posteriori *estimate* of the
    fixed-point iterate's distance to the fixed point of the model map, before refinement: not a
    bound, since ``q`` is estimated (NaN when ``q`` is unknown, inf when ``q >= 1``).
    ``refine_passes`` counts the data passes the refinement made and ``refine_residual`` is its
    relative residual (below 1 means better than not moving).
    """

    params: Params
    converged: jax.Array
    status: jax.Array
    iterations: jax.Array
    step_norm: jax.Array
    contraction: jax.Array
    error_estimate: jax.Array
    refine_passes: jax.Array
    refine_residual: jax.Array
    stats: UnlearnStats

    @property
    def value(self) -> Params:
        """The returned parameters (optimistix's name)."""
        return self.params

    @property
    def result(self) -> jax.Array:
        """The result code (optimistix's name for ``status``)."""
        return self.status

    @property
    def error_bound(self) -> jax.Array:
        """Old name of `error_estimate` (an estimate, not a bound)."""
        return self.error_estimate

    def reason(self) -> str | list[str]:
        """Why the solve stopped; a list with one message per request for a batched result."""
        return _per_request(REASONS, self.status)

    def status_name(self) -> str | list[str]:
        """Short name of the result code (``converged``, ``expanding``, ...); a list for a batch."""
        return _per_request(STATUS_NAMES, self.status)

    def curvature(self) -> str | list[str]:
        """The curvature path that ran (``ekfac``, ``lbfgs`` or ``exact``); a list for a batch."""
        return _per_request(CURVATURES, self.stats.curvature)

    def request(self, i: int) -> UnlearnResult:
        """Request ``i`` of a batched result from `fixed_point_unlearn_many`, as a single result."""
        if np.ndim(self.status) == 0:
            raise ValueError("this is a single request's result, not a batch from unlearn_many")
        return jax.tree.map(lambda a: a[i], self)


class UnlearnError(RuntimeError):
    """Raised by `fixed_point_unlearn` (``throw=True``) when a request fails; ``.result`` holds the
    `UnlearnResult` (its ``params`` are the input parameters)."""

    def __init__(self, message: str, result: UnlearnResult):
        super().__init__(message)
        self.result = result
