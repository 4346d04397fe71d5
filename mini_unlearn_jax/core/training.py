"""Pure, jitted training with optax and a snapshot buffer; retraining reuses the same recipe.

Removing examples is expressed as a 0/1 ``weights`` vector over the training set, so a
retrain on ``D \\ R`` runs the very same compiled program as training on ``D``: the
same init, optimizer, number of steps and mini-batch order, with ``R`` masked out of
every batch (a batch's loss is the mean over its kept examples).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import aot
from .models import Objective, check_param_dtypes
from .snapshots import SnapshotBuffer, SnapshotState, TrajectoryBuffer, snapshot_buffer

Params = Any


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training recipe.

    Attributes:
      optimizer: ``lbfgs`` (full batch; the default for convex models), ``adam`` or ``sgd``; or
        your own optax optimizer: a factory called with the learning rate (``optax.adamw``,
        ``functools.partial(optax.sgd, momentum=0.9)``), which trajectory unlearning's
        retraining phase then calls with its one-cycle schedule, or a ready
        ``optax.GradientTransformation``, which every method uses as it is (its own schedule).
      learning_rate: step size for adam/sgd or your factory (ignored by lbfgs, which line-searches).
      steps: maximum number of optimizer steps.
      batch_size: ``None`` for full batch, else the mini-batch size.
      tol: full batch only -- stop once the objective's gradient norm is below ``tol``.
      seed: seeds the init (done by the caller) and the mini-batch order.
      snapshots: K, the snapshot buffer size; 0 keeps no snapshot buffer, and then training runs
        no full-data gradient pass at all (a network that keeps only a trajectory buffer).
      snapshot_every: the buffer keeps steps ``t`` with ``t % snapshot_every == 0``.
      chunk: steps per compiled chunk (progress is printed between chunks).
      lr_schedule: ``"constant"``, or ``"cosine"``: the learning rate decays from
        ``learning_rate`` to 0 over ``steps`` (``optax.cosine_decay_schedule``) in training and
        retraining. Unlearning methods run their own short phases at a constant or one-cycle
        rate, whatever the recipe's schedule (not for lbfgs or a ready GradientTransformation).
    """

    optimizer: str = "lbfgs"
    learning_rate: float = 1e-3
    steps: int = 1000
    batch_size: int | None = None
    tol: float = 1e-5
    seed: int = 0
    snapshots: int = 8
    snapshot_every: int = 1
    chunk: int = 100
    lr_schedule: str = "constant"

    def __post_init__(self):
        if not (self.optimizer in ("lbfgs", "adam", "sgd") or callable(self.optimizer)
                or isinstance(self.optimizer, optax.GradientTransformation)):
            raise ValueError(f"unknown optimizer {self.optimizer!r}: use lbfgs, adam or sgd, an optax optimizer "
                             "factory such as optax.adamw, or an optax.GradientTransformation")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.lr_schedule != "constant" and (self.optimizer == "lbfgs"
                                               or isinstance(self.optimizer, optax.GradientTransformation)):
            raise ValueError("lr_schedule applies to adam, sgd and optimizer factories; lbfgs line-searches and a "
                             "ready GradientTransformation carries its own schedule")
        if self.optimizer == "lbfgs" and self.batch_size is not None:
            raise ValueError("lbfgs trains full batch: set batch_size=None or use adam/sgd")
        if self.steps < 1 or self.snapshots < 0 or self.snapshot_every < 1 or self.chunk < 1:
            raise ValueError("steps, snapshot_every and chunk must be positive, snapshots at least 0")
        if self.snapshots == 0 and (self.batch_size is None or self.optimizer == "lbfgs"):
            raise ValueError("snapshots=0 (no snapshot buffer) is for mini-batch recipes; full-batch training keeps "
                             "at least one snapshot (the fixed point reads it)")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


def default_config(model: str, n_train: int, seed: int = 0) -> TrainConfig:
    """The recipe the CLI uses: L-BFGS to convergence for logreg, Adam mini-batches for the MLP,
    and for the CNN the recipe of experiments/cnn_benchmark/config.toml (Adam at 2e-3 with cosine
    decay, batches of 128, 20 epochs). A network is unlearned along its trajectory, which reads no
    full-data gradient, so the CNN's gradient snapshot buffer holds one entry, the trained model's
    (two full-data gradient passes in all: step 0's, which the final one replaces), where the
    MLP's holds eight."""
    if model == "logreg":
        return TrainConfig(optimizer="lbfgs", steps=1000, tol=1e-5, seed=seed, snapshots=8)
    if model == "cnn":
        batch = min(128, n_train)
        steps = 20 * max(1, -(-n_train // batch))
        return TrainConfig(optimizer="adam", learning_rate=2e-3, lr_schedule="cosine", steps=steps, batch_size=batch,
                           tol=0.0, seed=seed, snapshots=1, snapshot_every=steps, chunk=max(1, min(500, steps)))
    batch = min(256, n_train)
    epochs = 30
    steps = epochs * max(1, -(-n_train // batch))
    return TrainConfig(optimizer="adam", learning_rate=1e-3, steps=steps, batch_size=batch, tol=0.0,
                       seed=seed, snapshots=8, snapshot_every=max(1, steps // 8), chunk=max(1, min(500, steps)))


class TrainState(NamedTuple):
    step: jax.Array
    params: Params
    opt_state: Any
    snapshots: SnapshotState
    grad_norm: jax.Array  # norm of the full objective's gradient at the last full-batch step
    trajectory: Any = ()  # a TrajectoryState when the Trainer keeps a trajectory buffer


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The recipe's optax optimizer (see :class:`TrainConfig`'s ``optimizer``)."""
    if isinstance(cfg.optimizer, optax.GradientTransformation):
        return cfg.optimizer
    if cfg.optimizer == "lbfgs":
        return optax.lbfgs(memory_size=20)
    lr = cfg.learning_rate
    if cfg.lr_schedule == "cosine":
        lr = optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps)
    if callable(cfg.optimizer):
        return cfg.optimizer(lr)
    return optax.adam(lr) if cfg.optimizer == "adam" else optax.sgd(lr)


def batch_indices(step, n: int, batch_size: int | None, seed: int) -> tuple[jax.Array, jax.Array]:
    """The mini-batch schedule of every recipe: indices ``[B]`` (clipped to ``n - 1``) and the
    real-slot mask ``[B]`` of batch ``step``.

    An epoch-wise permutation of ``n`` from ``fold_in(key(seed), epoch)``, padded to whole batches;
    padding slots are not real. ``batch_size=None`` is the full batch. DeltaGrad's replay and the
    trajectory method read the same schedule.
    """
    if batch_size is None:
        return jnp.arange(n), jnp.ones((n,), bool)
    per_epoch = -(-n // batch_size)
    epoch, b = step // per_epoch, step % per_epoch
    perm = jax.random.permutation(jax.random.fold_in(jax.random.key(seed), epoch), n)
    pad = per_epoch * batch_size - n
    perm = jnp.concatenate([perm, jnp.full((pad,), n, perm.dtype)])  # n marks a padding slot
    idx = jax.lax.dynamic_slice(perm, (b * batch_size,), (batch_size,))
    return jnp.minimum(idx, n - 1), idx < n


class Trainer:
    """Holds the compiled step functions for one (objective, recipe); pure underneath."""

    def __init__(self, objective: Objective, cfg: TrainConfig, *, trajectory: TrajectoryBuffer | None = None):
        """``trajectory``: a :func:`~mini_unlearn_jax.core.snapshots.trajectory_buffer` to fill as
        well (``w_t`` after step ``t`` for ``t`` in its schedule, and ``w_0``); None: none."""
        self.objective = objective
        self.cfg = cfg
        self.trajectory = trajectory
        self.opt = make_optimizer(cfg)
        self.buffer: SnapshotBuffer | None = snapshot_buffer(cfg.snapshots, cfg.snapshot_every) if cfg.snapshots else None
        self._run_chunk = jax.jit(self._chunk, static_argnames=("length",))
        self._init = jax.jit(self.init)
        self._finish = jax.jit(self.finish)
        self.compile_s = 0.0  # seconds spent compiling, accumulated over fit() calls

    def _call(self, name: str, fn, *args, **static):
        """Run ``fn`` through an ahead-of-time compiled executable, timing compilation apart.

        Executables are shared by every Trainer of the same (objective, recipe) in the process."""
        sched = None if self.trajectory is None else self.trajectory.schedule
        key = (self.objective, self.cfg, sched, name, tuple(sorted(static.items())), aot.signature(args))
        exe, seconds = aot.compiled(key, lambda: fn.lower(*args, **static))
        self.compile_s += seconds
        return exe(*args)

    # -- pure pieces -----------------------------------------------------------------------
    def full_data_grad(self, params, x, y, weights):
        """Gradient of the (weighted) data term over the whole training set."""
        return jax.grad(self.objective.data_loss)(params, x, y, weights)

    def init(self, params: Params) -> TrainState:
        opt_state = self.opt.init(params)
        traj = ()
        if self.trajectory is not None:
            traj = self.trajectory.update(self.trajectory.init(params, opt_state), 0, params, opt_state)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=opt_state,
            snapshots=self.buffer.init(params) if self.buffer is not None else (),
            grad_norm=jnp.asarray(jnp.inf, jnp.float32),
            trajectory=traj,
        )

    def step(self, state: TrainState, x, y, weights) -> TrainState:
        """One optimizer step (pure)."""
        obj, cfg = self.objective, self.cfg
        if cfg.batch_size is None:
            fn = lambda p: obj.value(p, x, y, weights)
            if cfg.optimizer == "lbfgs":
                value, grad = optax.value_and_grad_from_state(fn)(state.params, state=state.opt_state)
                updates, opt_state = self.opt.update(grad, state.opt_state, state.params, value=value, grad=grad, value_fn=fn)
            else:
                value, grad = jax.value_and_grad(fn)(state.params)
                updates, opt_state = self.opt.update(grad, state.opt_state, state.params)
            data_grad = jax.tree.map(jnp.subtract, grad, obj.penalty_grad(state.params))
            snaps = self.buffer.update(state.snapshots, state.step, state.params, data_grad)
            gnorm = optax.tree.norm(grad).astype(state.grad_norm.dtype)
        else:
            bidx, bw = self._batch(state.step, weights)
            fn = lambda p: obj.data_loss(p, x[bidx], y[bidx], bw) + obj.penalty(p)
            grad = jax.grad(fn)(state.params)
            updates, opt_state = self.opt.update(grad, state.opt_state, state.params)
            snaps = state.snapshots
            if self.buffer is not None:
                snaps = jax.lax.cond(
                    state.step % cfg.snapshot_every == 0,
                    lambda s: self.buffer.update(s, state.step, state.params, self.full_data_grad(state.params, x, y, weights)),
                    lambda s: s,
                    snaps,
                )
            gnorm = state.grad_norm
        params = optax.apply_updates(state.params, updates)
        traj = state.trajectory
        if self.trajectory is not None:
            traj = self.trajectory.update(traj, state.step + 1, params, opt_state)
        return TrainState(state.step + 1, params, opt_state, snaps, gnorm, traj)

    def finish(self, state: TrainState, x, y, weights) -> TrainState:
        """Canonicalise the final parameters and record ``(T, w*, grad G_D(w*))`` in the buffer
        (without a buffer, ``snapshots=0``, no gradient is computed and ``grad_norm`` is NaN)."""
        if self.objective.canonicalize is not None:
            state = state._replace(params=self.objective.canonicalize(state.params))
        if self.buffer is None:
            return state._replace(grad_norm=jnp.full_like(state.grad_norm, jnp.nan))
        g = self.full_data_grad(state.params, x, y, weights)
        snaps = self.buffer.update(state.snapshots, state.step, state.params, g, force=True)
        full = jax.tree.map(jnp.add, g, self.objective.penalty_grad(state.params))
        return state._replace(snapshots=snaps, grad_norm=optax.tree.norm(full).astype(state.grad_norm.dtype))

    def _batch(self, step, weights):
        """Indices and weights of mini-batch ``step`` (:func:`batch_indices`)."""
        idx, real = batch_indices(step, weights.shape[0], self.cfg.batch_size, self.cfg.seed)
        return idx, jnp.where(real, weights[idx], 0.0)

    def _chunk(self, state: TrainState, x, y, weights, length: int) -> TrainState:
        def body(s, _):
            return self.step(s, x, y, weights), None

        state, _ = jax.lax.scan(body, state, None, length=length)
        return state

    # -- driver ----------------------------------------------------------------------------
    def fit(self, params: Params, x, y, weights=None, *, verbose: bool = False, label: str = "train") -> TrainState:
        """Train from ``params`` for ``cfg.steps`` steps (or until ``tol``); returns the final state.

        With a snapshot buffer, the final parameters and their full-data gradient are always
        written to it, so its newest entry is ``(T, w*, grad G_D(w*))``.
        """
        cfg = self.cfg
        check_param_dtypes(params, f"{label}: the parameters")
        x = jnp.asarray(x)
        pdtype = jnp.result_type(*jax.tree.leaves(params))
        if jnp.issubdtype(x.dtype, jnp.floating) and jnp.issubdtype(pdtype, jnp.floating) and x.dtype != pdtype:
            x = x.astype(pdtype)  # the model computes in its parameters' dtype (float64 data under x64, say)
        y = jnp.asarray(y)
        weights = jnp.asarray(np.ones((x.shape[0],), np.float32) if weights is None else weights, jnp.float32)
        # every jax computation runs through an ahead-of-time compiled program, so that
        # compile_s holds all of the compilation and the rest of the wall time is running
        state = self._call("init", self._init, params)
        t0 = time.perf_counter()
        done = 0
        while done < cfg.steps:
            length = min(cfg.chunk, cfg.steps - done)
            state = self._call("chunk", self._run_chunk, state, x, y, weights, length=length)
            done += length
            gn = float(state.grad_norm)
            if verbose:
                msg = f"[{label}] step {done}/{cfg.steps}"
                if cfg.batch_size is None:
                    msg += f"  grad-norm {gn:.2e}"
                print(msg + f"  ({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
            if not np.isfinite(gn) and cfg.batch_size is None:
                raise FloatingPointError(f"{label}: training diverged (gradient norm {gn}); lower the learning rate")
            if cfg.batch_size is None and gn < cfg.tol:
                break
        return self._call("finish", self._finish, state, x, y, weights)


def train(objective: Objective, cfg: TrainConfig, params: Params, x, y, weights=None, **kw) -> TrainState:
    """Functional entry point: ``Trainer(objective, cfg).fit(params, x, y, weights)``."""
    return Trainer(objective, cfg).fit(params, x, y, weights, **kw)
