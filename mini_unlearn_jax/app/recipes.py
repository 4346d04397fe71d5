"""Shared experiment recipes: "load data, train, fit curvature statistics, build a Problem" once.

:func:`build_problem` is what the CLI's ``train``, the grid harness, the experiments and the
benchmarks call; :data:`RECIPES` names the settings several experiments share (the leaky MLP of
the privacy experiments, the fidelity MLP), so each is written once.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..core import linalg as cv
from ..core import trajectory as tj
from ..core.models import build_model, init_params, make_objective
from ..core.problem import Problem
from ..core.snapshots import log_schedule, trajectory_buffer
from ..core.training import TrainConfig, Trainer, TrainState, default_config
from .data import Dataset, load_dataset


class Trained(NamedTuple):
    """What :func:`build_problem` returns."""

    problem: Problem  # objective, recipe, params0, w*, buffers, EKFAC stats (logreg), data, extras
    dataset: Dataset
    model: Any  # the flax module
    state: TrainState  # the final training state (optimizer state, steps run, gradient norm)
    train_s: float  # training wall seconds, compilation excluded
    train_compile_s: float
    stats_s: float  # fitting the curvature statistics (0 without them)
    val_indices: np.ndarray | None = None  # the held-out test images of a trajectory run


TRAJECTORY_SIZE = 12  # snapshots in a trajectory buffer (log-spaced steps)
VALIDATION_SIZE = 500  # held-out test images trajectory unlearning reads (at most half the test set)


def validation_indices(n_test: int, seed: int, size: int = VALIDATION_SIZE) -> np.ndarray:
    """The held-out split of a trajectory run: a seeded sample of ``min(size, n_test // 2)`` test
    images (``size`` default 500), read by trajectory unlearning (rewind rule, calibration) and
    therefore never used as membership-inference non-members. The rewind rule's noise falls as
    1/sqrt(size): ~0.013 at 500 once a model fits (experiments/trajectory/results/rewind_noise/table.md)."""
    size = min(int(size), n_test // 2)
    return np.sort(np.random.default_rng([seed, 17]).choice(n_test, size=size, replace=False)).astype(np.int32)


def unread_test_indices(n_test: int, val_indices) -> np.ndarray:
    """The test images trajectory unlearning never reads: all ``n_test`` but ``val_indices`` (the
    held-out split, or the union of several). Test metrics and attack non-members come from these."""
    return np.setdiff1d(np.arange(n_test), np.asarray(val_indices, np.int64)).astype(np.int32)


def keeps_trajectory(model: str, cfg: TrainConfig) -> bool:
    """The CLI's rule, which the harness shares: non-convex mini-batch training (an MLP or the CNN
    under Adam or SGD with a batch size) keeps a trajectory buffer, so that ``mini`` is trajectory unlearning;
    logistic regression and full-batch or L-BFGS recipes do not."""
    return model != "logreg" and cfg.batch_size is not None and cfg.optimizer != "lbfgs"


def build_problem(data: str | Dataset, model: str, l2: float, seed: int = 0, *, hidden: int = 256,
                  penalize_bias: bool = False, config: TrainConfig | None = None, verbose: bool = False,
                  trajectory: bool | dict | str | None = None, val_indices=None, **overrides) -> Trained:
    """Load ``data`` (a spec for :func:`load_dataset`, or a Dataset), train ``model`` (``"logreg"``
    or ``"mlp"``) with the recipe ``config`` (default: :func:`default_config` for the model and
    data size at ``seed``, with ``overrides`` replacing its fields), fit curvature statistics
    where the model has them, and return the :class:`Problem` with what it cost.

    ``trajectory`` (True, ``"auto"`` for :func:`keeps_trajectory`'s rule, or a dict with ``size``,
    ``schedule``, ``with_opt_state`` and ``keep_snapshots``, default True) also fills a trajectory
    buffer during the same training steps, and puts a :class:`~mini_unlearn_jax.core.trajectory.TrajectoryData` in
    ``problem.extras["trajectory"]`` (the buffer, the held-out split ``val_indices`` of the test
    set -- default :func:`validation_indices` -- and its memorisation profile), so ``mini`` runs
    trajectory unlearning. ``keep_snapshots=False`` leaves the gradient buffer empty (no
    full-data gradient passes; ``problem.snapshots`` is then None)."""
    ds = load_dataset(data) if isinstance(data, str) else data
    module = build_model(model, ds.num_classes, hidden=hidden)
    objective = make_objective(module, l2, penalize_bias=penalize_bias)
    cfg = config if config is not None else default_config(model, ds.n_train, seed=seed)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    params0 = init_params(module, ds.x_train[0], cfg.seed)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    buf, train_cfg = None, cfg
    if isinstance(trajectory, str):
        if trajectory != "auto":
            raise ValueError(f"trajectory={trajectory!r}: give true, false, \"auto\" or a dict of options")
        trajectory = keeps_trajectory(model, cfg)
    if trajectory:
        opts = {} if trajectory is True else dict(trajectory)
        size, schedule = opts.pop("size", TRAJECTORY_SIZE), opts.pop("schedule", None)
        with_opt_state, keep = opts.pop("with_opt_state", False), opts.pop("keep_snapshots", True)
        if opts:
            raise ValueError(f"unknown trajectory options {sorted(opts)}: size, schedule, with_opt_state, keep_snapshots")
        if cfg.batch_size is None or cfg.optimizer == "lbfgs":
            raise ValueError("a trajectory buffer is for mini-batch recipes (adam or sgd with a batch size)")
        schedule = tuple(schedule) if schedule is not None else log_schedule(cfg.steps, min(size, cfg.steps + 1))
        buf = trajectory_buffer(schedule, with_opt_state=with_opt_state)
        if not keep:  # no snapshot buffer: no full-data gradient passes
            train_cfg = dataclasses.replace(cfg, snapshots=0)
    trainer = Trainer(objective, train_cfg, trajectory=buf)
    t0 = time.perf_counter()
    state = trainer.fit(params0, x, y, verbose=verbose)
    jax.block_until_ready(state.params)
    train_s = time.perf_counter() - t0 - trainer.compile_s
    t0 = time.perf_counter()
    stats = cv.fit_stats(objective, state.params, x)
    stats_s = time.perf_counter() - t0 if stats is not None else 0.0
    extras, vi = {}, None
    if buf is not None:
        vi = validation_indices(len(ds.x_test), seed) if val_indices is None else np.asarray(val_indices, np.int32)
        x_val, y_val = jnp.asarray(ds.x_test[vi]), jnp.asarray(ds.y_test[vi])
        profile = tj.memorisation_profile(objective, state.trajectory, x, y, x_val, y_val)
        extras["trajectory"] = tj.TrajectoryData(state.trajectory, x_val, y_val, profile)
    snapshots = state.snapshots if train_cfg is cfg else None
    problem = Problem(objective, cfg, params0, state.params, snapshots, stats, x, y, extras)
    return Trained(problem, ds, module, state, train_s, trainer.compile_s, stats_s, vi)


def _adam(steps: int, seed: int, batch_size: int = 128, lr: float = 1e-3) -> TrainConfig:
    return TrainConfig(optimizer="adam", learning_rate=lr, steps=steps, batch_size=batch_size, tol=0.0, seed=seed,
                       snapshots=8, snapshot_every=max(1, steps // 8), chunk=min(400, steps))


# name -> (data spec, model, l2, hidden, recipe(seed) or None for default_config)
RECIPES: dict[str, tuple[str, str, float, int, Any]] = {
    # memorises hard: 2,000 images, 102 epochs of Adam (experiments/privacy, mlp_limits, trajectory)
    "leaky-mlp": ("fashion_mnist:n_train=2000", "mlp", 1e-5, 256, lambda seed: _adam(1600, seed)),
    # the fidelity table's MLP: 10,000 images, the CLI's default MLP recipe (30 epochs)
    "fidelity-mlp": ("fashion_mnist:n_train=10000", "mlp", 1e-4, 256, None),
    # experiments/grid/grid.toml's shorter MLP (5,000 images, 600 steps; tests/test_grid.py keeps the two in step),
    # the setting of experiments/trajectory_budget/run.py --setting grid-mlp
    "grid-mlp": ("fashion_mnist:n_train=5000", "mlp", 1e-4, 128, None),
    # the main job's logistic regression on all of Fashion-MNIST
    "fashion-logreg": ("fashion_mnist", "logreg", 1e-3, 0, None),
}


def recipe(name: str, seed: int = 0, *, data: str | Dataset | None = None, **overrides) -> Trained:
    """Train the named setting of :data:`RECIPES` (``data`` replaces its data spec, e.g. a smaller
    subset for a smoke run; ``overrides`` replace ``l2``, ``hidden`` or recipe fields such as
    ``steps``, or pass :func:`build_problem`'s keywords)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
    spec, model, l2, hidden, make_cfg = RECIPES[name]
    l2, hidden = overrides.pop("l2", l2), overrides.pop("hidden", hidden)
    config = make_cfg(seed) if make_cfg is not None else None
    if config is not None and "steps" in overrides:  # snapshots stay spread over the shorter run
        config = _adam(int(overrides.pop("steps")), seed, config.batch_size, config.learning_rate)
    return build_problem(data if data is not None else spec, model, l2, seed, hidden=hidden or 256,
                         config=config, **overrides)
