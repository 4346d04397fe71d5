"""What every unlearning method reads and returns: :class:`Problem` and :class:`MethodOutput`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from . import linalg as cv
from .models import Objective
from .training import TrainConfig

Params = Any
# a ground-truth recipe given as a function: recipe(params0, x, y, weights) -> trained params,
# ``weights`` the 0/1 keep mask over the rows of ``x``
Recipe = Callable[[Params, jax.Array, jax.Array, jax.Array], Params]


@dataclasses.dataclass
class Problem:
    """A trained model and the data it was trained on.

    Attributes:
      objective: the training objective.
      train_config: the recipe that trained ``params`` (retraining reuses it): a
        :class:`TrainConfig` (data), or, for a model trained by your own loop, a function
        ``recipe(params0, x, y, weights) -> params`` that retrains with example weights ``weights``
        (1 kept, 0 removed). Methods that need the optimizer itself (``finetune``, the trajectory
        method) need a :class:`TrainConfig`; :func:`~mini_unlearn_jax.core.methods.applicable` says
        which apply.
      params0: the initial parameters of that recipe.
      params: the trained parameters ``w*``.
      snapshots: the snapshot buffer from training (newest entry at ``w*``).
      stats: curvature statistics saved at training time (EKFAC for logreg) or None.
      x, y: the training set.
      extras: method-specific training-time state, by name (e.g. ``"trajectory"``: the trajectory
        buffer and held-out split that trajectory unlearning reads). Empty by default.
    """

    objective: Objective
    train_config: TrainConfig | Recipe
    params0: Params
    params: Params
    snapshots: Any
    stats: cv.EKFAC | None
    x: jax.Array
    y: jax.Array
    extras: dict = dataclasses.field(default_factory=dict)

    @property
    def recipe(self) -> TrainConfig | None:
        """The :class:`TrainConfig` when the recipe is given as data, else None."""
        return self.train_config if isinstance(self.train_config, TrainConfig) else None


class MethodOutput(NamedTuple):
    """A method's result: parameters, whether they are to be trusted, why, and what it cost.

    ``time_s`` excludes compilation (``compile_s``); ``converged`` False means ``params`` is the
    input model (or the method's own starting model), never a diverged one. ``buffers``: the
    training-time state the method rebuilt for the unlearned model, by name (``"trajectory"``: the
    :class:`~mini_unlearn_jax.core.snapshots.TrajectoryState` of trajectory unlearning or of
    retraining), which :func:`~mini_unlearn_jax.core.methods.refresh_for_next_request` stores in
    place of the trained model's; None when it rebuilt none."""

    params: Params
    converged: bool
    reason: str
    time_s: float
    compile_s: float
    info: dict
    buffers: dict | None = None


def keep_mask(n: int, forget) -> np.ndarray:
    """0/1 float32 weights over ``n`` rows: 0 at ``forget``."""
    keep = np.ones(n, np.float32)
    keep[np.asarray(forget, dtype=np.int64)] = 0.0
    return keep
