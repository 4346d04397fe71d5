"""The entry point: unlearn a trained model with the algorithm that works for it.

:func:`make_problem` gathers what training produced -- the objective, the trained parameters,
the data, the recipe, and the buffers kept along the way -- into a
:class:`~mini_unlearn_jax.core.problem.Problem`; :func:`unlearn` removes a forget set from it:

- a model that kept a trajectory buffer (any network trained with mini-batches) is unlearned
  by *trajectory unlearning*: rewind to the latest snapshot that fits the removed examples no
  better than unseen data, retrain briefly on the rest with the recipe's optimizer, recalibrate;
- a convex objective (logistic regression, or one declared with ``make_objective(...,
  convex=True)``) with a gradient snapshot buffer is unlearned by the contraction-mapping
  fixed point (Mini-Unlearning proper);
- anything else is refused with what to keep or choose instead: the fixed point of a network
  is (nearly) the trained model, and returning it as "converged" would be a no-op reported as
  success.

Any registered method can be named instead (``method="retrain"``, ...); it is refused the same
way where it cannot do its job. The next request starts from :func:`after_removal`, which
stores nothing computed over the removed examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import linalg as cv
from . import methods as M
from . import registry as R
from . import trajectory as tj
from .mini_result import UnlearnError
from .models import Objective, check_param_dtypes
from .problem import Problem, Recipe
from .snapshots import SnapshotState, TrajectoryState
from .training import TrainConfig

Params = Any


def make_problem(objective: Objective, params: Params, x, y, *, recipe: TrainConfig | Recipe | None = None,
                 params0: Params | None = None, snapshots: SnapshotState | None = None, stats: cv.EKFAC | None = None,
                 trajectory: TrajectoryState | None = None, heldout: tuple[Any, Any] | None = None) -> Problem:
    """What :func:`unlearn` reads, from what your training produced.

    Args:
      objective: the training objective (:func:`~mini_unlearn_jax.core.models.make_objective`).
      params: the trained parameters ``w*`` (float32 or float64; bfloat16 is refused, see
        :func:`~mini_unlearn_jax.core.models.check_param_dtypes`).
      x, y: the training set, in the order training indexed it (forget indices refer to it).
      recipe: how the model was trained: a :class:`~mini_unlearn_jax.core.training.TrainConfig`
        (its ``optimizer`` may be your own optax optimizer; trajectory unlearning retrains with
        it, for ``budget * steps`` steps of ``batch_size``), or a function ``recipe(params0, x,
        y, weights) -> params`` that retrains with 0/1 example weights (enough for ``retrain``
        and the fixed point).
      params0: the initial parameters of that training (retraining starts there).
      snapshots: the gradient snapshot buffer (:func:`~mini_unlearn_jax.core.snapshots.snapshot_buffer`),
        for the fixed point.
      stats: curvature statistics; for logistic regression they are fitted here when omitted.
      trajectory: the trajectory buffer (:func:`~mini_unlearn_jax.core.snapshots.trajectory_buffer`),
        whose last slot holds ``params``, for trajectory unlearning.
      heldout: ``(x_val, y_val)``, labelled examples never trained on, which trajectory
        unlearning reads for its rewind rule and calibration (keep them out of your test metrics
        and membership-attack non-members).
    """
    check_param_dtypes(params)
    x, y = jnp.asarray(x), jnp.asarray(y)
    if stats is None and objective.kind == "logreg":
        stats = cv.fit_stats(objective, params, x)
    extras = {}
    if trajectory is not None:
        if heldout is None:
            raise ValueError("trajectory unlearning reads a labelled held-out set the model was never trained on: "
                             "pass heldout=(x_val, y_val) (a few hundred examples, e.g. from your validation split)")
        last = jax.tree.map(lambda a: a[-1], trajectory.params)
        if int(np.asarray(trajectory.steps)[-1]) < 0 or not all(
                np.allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
                for a, b in zip(jax.tree.leaves(last), jax.tree.leaves(params), strict=True)):
            raise ValueError("the trajectory buffer's last slot does not hold the trained parameters: its schedule "
                             "must end at the last training step (log_schedule(T, K)), and update(traj, T, params) "
                             "must run after the last step")
        x_val, y_val = jnp.asarray(heldout[0]), jnp.asarray(heldout[1])
        profile = tj.memorisation_profile(objective, trajectory, x, y, x_val, y_val)
        extras["trajectory"] = tj.TrajectoryData(trajectory, x_val, y_val, profile)
    return Problem(objective, recipe, params0, params, snapshots, stats, x, y, extras)


class Unlearned(NamedTuple):
    """What :func:`unlearn` returns for one request.

    Attributes:
      params: the unlearned parameters; the input parameters, bit for bit, when not converged.
      converged: whether the method succeeded (never True for a no-op or a diverged result).
      reason: what happened, in words.
      method: the registered method that ran.
      time_s: its run time, compilation excluded (``compile_s``).
      info: the method's details (rewind step, iterations, ...).
      buffers: training-time state the method rebuilt for the unlearned model (pass it to
        :func:`after_removal` for the next request).
    """

    params: Params
    converged: bool
    reason: str
    method: str
    time_s: float
    compile_s: float
    info: dict
    buffers: dict | None = None


class UnlearnedBatch(NamedTuple):
    """What :func:`unlearn` returns for several independent requests: ``results[i]`` (also
    :meth:`request`) is request ``i``'s :class:`Unlearned`; ``params`` stacks their parameters
    along a leading axis, ``converged`` is a boolean array."""

    results: tuple[Unlearned, ...]

    def request(self, i: int) -> Unlearned:
        return self.results[i]

    def __len__(self) -> int:
        return len(self.results)

    @property
    def params(self) -> Params:
        return jax.tree.map(lambda *a: jnp.stack(a), *(r.params for r in self.results))

    @property
    def converged(self) -> np.ndarray:
        return np.asarray([r.converged for r in self.results])

    @property
    def reason(self) -> list[str]:
        return [r.reason for r in self.results]


def choose_method(problem: Problem) -> str:
    """The registered method :func:`unlearn` runs on ``problem`` by default (module docstring);
    ValueError saying what to keep or choose when none fits."""
    why_traj = R.applicable("trajectory", problem)
    if why_traj is None:
        return "trajectory"
    why_fixed = R.applicable("mini", problem)
    if why_fixed is None:
        return "mini"
    raise ValueError("no unlearning method applies to this model: trajectory unlearning does not, because "
                     f"{why_traj}; the fixed point does not, because {why_fixed}. Retraining always applies: "
                     "unlearn(problem, forget, method='retrain')")


def _is_batch(forget) -> bool:
    return isinstance(forget, Sequence) and not isinstance(forget, str) and len(forget) > 0 \
        and all(np.ndim(f) == 1 for f in forget)


def unlearn(problem: Problem, forget, *, method: str = "auto", throw: bool = True,
            **options) -> Unlearned | UnlearnedBatch:
    """Remove the training examples ``forget`` (indices into ``problem.x``) from the trained model.

    Args:
      problem: from :func:`make_problem` (or ``load_run(...).problem(x, y)``).
      forget: 1-D integer indices; or a list of such arrays, several independent requests on the
        same model (an :class:`UnlearnedBatch` comes back).
      method: ``"auto"`` (:func:`choose_method`) or any registered method's name.
      throw: raise :class:`~mini_unlearn_jax.core.mini_result.UnlearnError` (its ``.result`` holds the
        result) when the method did not succeed; with ``throw=False`` the result says so.
      **options: the method's options (e.g. ``budget=0.25`` for trajectory unlearning).

    Raises:
      ValueError: the method does not apply to this model (the message says what to do).
    """
    name = choose_method(problem) if method == "auto" else method
    requests = list(forget) if _is_batch(forget) else [forget]
    results = []
    for r in requests:
        out = R.run_method(name, problem, r, **options)
        res = Unlearned(out.params, bool(out.converged), out.reason, name, out.time_s, out.compile_s, out.info,
                        out.buffers)
        if throw and not res.converged:
            raise UnlearnError(f"{name} did not succeed: {res.reason} (the result, holding the input parameters, "
                               "is in this exception's .result)", res)
        results.append(res)
    return UnlearnedBatch(tuple(results)) if _is_batch(forget) else results[0]


def after_removal(problem: Problem, result: Unlearned, forget) -> Problem:
    """The problem for the next request after ``result`` removed ``forget`` from ``problem``: the
    remaining data, the unlearned model and buffers rebuilt for it, nothing computed over the
    removed examples (:func:`~mini_unlearn_jax.core.methods.after_removal`). Indices of the next
    request refer to the remaining rows, in their original order."""
    if not result.converged:
        raise ValueError(f"the request did not succeed ({result.reason}); there is no unlearned model to continue from")
    return M.after_removal(problem, result.params, forget, result.buffers)
