"""Trajectory unlearning for non-convex models: rewind along a log-spaced snapshot buffer.

On an over-parameterised network the retrained model is singled out by its trajectory from the
initialisation, not by the remaining-data objective (method.md section 6). This module keeps
that trajectory in a compact buffer and unlearns by going back along it:

1. **The snapshot policy** (:func:`trajectory_buffer`, :func:`log_schedule`): ``K`` parameter
   snapshots at a fixed, log-spaced schedule of steps (``0, 1, 2, 4, 9, ..., T`` for ``K = 12``,
   ``T = 1600``), so the early part of training, where memorisation has not started, survives at
   a fixed ``K``. A fixed-shape pytree filled by pure ``init / update`` functions that a training
   step threads through ``jax.lax.scan`` (optionally with the optimizer state at each snapshot).
   :func:`train_with_trajectory` trains with the project's recipe (the same program as
   :class:`~mini_unlearn_jax.core.training.Trainer`, bit for bit) and fills it.
2. **The method** (:func:`trajectory_unlearn`, :func:`run_trajectory`):

   - *rewind*: for every snapshot ``w_t`` the memorisation gap ``m_t`` = mean true-class
     probability on the forget set minus that on a held-out set (forward passes only; the forget
     set is subsampled to at most ``max_eval`` examples), and the same gap on the whole training
     set (:func:`memorisation_profile`, computed once after training: for a random forget set it
     has the same expectation with ~``n/r`` times less noise). The rule reads the profile, raised
     where the forget set's gap exceeds it by more than ``noise_z`` standard errors of the
     forget-set mean (a forget set fit better than a random subset of its size, such as a
     memorised subgroup or a class); it restarts from the latest snapshot whose gap is at most
     ``threshold`` (the forget set is fit no better than unseen data), or from the
     initialisation if there is none;
   - *retrain fast*: ``budget * T`` steps on the remaining data with a one-cycle schedule
     peaking at ``peak_lr_scale`` times the recipe's learning rate (fresh optimizer state): Adam
     for the built-in recipes, the user's optimizer where the recipe names one
     (:func:`phase_optimizer`; a ready ``GradientTransformation`` keeps its own schedule);
   - *calibrate*: the retrained model is as over-confident on unseen data as the original (both
     ran the full recipe); a short run is not. The output logits are scaled by one temperature
     ``tau`` (the last layer's kernel and bias, which scales the logits of a final linear layer
     exactly) so that the mean held-out loss equals the original model's. ``tau`` leaves
     every prediction (argmax) unchanged.

   It never reads the retrained model. It reads the buffer, the original parameters, the
   training set with the removal mask, and a labelled held-out set (for the gap and the
   calibration target).

   *What the unlearned model keeps*: its own trajectory (:class:`TrajectoryResult`
   ``trajectory``): the snapshots up to the rewind point, which fit the removed examples no
   better than unseen data, and, in every later slot, the retraining phase at the same relative
   place (:func:`phase_schedule`), the last slot the result. No parameter of the original
   trajectory after the rewind point survives, so the next request rewinds along a trajectory
   that never saw the removed examples after it. A method that rebuilds no trajectory leaves
   only the initialisation (:func:`initial_only`).
3. **Baselines** (``core/baselines.py``) run on the same footing: the recipe's mini-batch size,
   :func:`keep_batches` over the kept rows, :func:`phase_optimizer`, a matched step budget.

Every ``run_*`` function returns :class:`~mini_unlearn_jax.core.methods.MethodOutput` with the run
time of an ahead-of-time compiled program and the compile time apart.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .adapters import find_head, scale_group
from .aot import aot, timed
from .models import Objective
from .problem import MethodOutput, keep_mask
from .snapshots import TrajectoryBuffer, TrajectoryState, log_schedule, trajectory_buffer  # noqa: F401  (re-exported)
from .training import TrainConfig, Trainer, TrainState

Params = Any


# =============================================================================
# The snapshot policy: K snapshots at a fixed, log-spaced schedule
# =============================================================================


def snapshot(state: TrajectoryState, i) -> Params:
    """The parameters in slot ``i``."""
    return jax.tree.map(lambda a: a[i], state.params)


def train_with_trajectory(objective: Objective, cfg: TrainConfig, params0: Params, x, y, weights=None, *,
                          schedule=None, size: int = 12, with_opt_state: bool = False,
                          keep_snapshots: bool = False) -> tuple[TrainState, TrajectoryState]:
    """Train with the mini-batch recipe ``cfg`` and fill a trajectory buffer.

    The optimizer steps are :meth:`Trainer.step`'s, so the final parameters equal
    ``Trainer(objective, cfg).fit(...)``'s bit for bit. ``schedule`` defaults to
    ``log_schedule(cfg.steps, size)``. With ``keep_snapshots`` the recipe's own snapshot buffer
    is filled too (and finished at ``w*``, as ``fit`` does), so the returned state serves the
    fixed-point methods as well; otherwise there is none (``snapshots=0``: no full-data gradient pass).

    Returns:
      ``(final TrainState, TrajectoryState)``; the buffer's last slot holds ``w*``.
    """
    if cfg.batch_size is None or cfg.optimizer == "lbfgs":
        raise ValueError("trajectory training is for mini-batch recipes (adam or sgd with a batch size)")
    schedule = tuple(schedule) if schedule is not None else log_schedule(cfg.steps, size)
    if schedule[-1] != cfg.steps:
        raise ValueError(f"the schedule must end at the last step {cfg.steps}, got {schedule[-1]}")
    x, y = jnp.asarray(x), jnp.asarray(y)
    w = jnp.ones((x.shape[0],), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    # without keep_snapshots the project's snapshot buffer is not needed: no full-data gradient pass
    trainer_cfg = cfg if keep_snapshots else dataclasses.replace(cfg, snapshots=0)
    return _train(objective, trainer_cfg, schedule, with_opt_state, keep_snapshots, params0, x, y, w)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _train(objective: Objective, cfg: TrainConfig, schedule: tuple, with_opt_state: bool, finish: bool,
           params0, x, y, w):
    trainer = Trainer(objective, cfg, trajectory=trajectory_buffer(schedule, with_opt_state=with_opt_state))
    st = trainer._chunk(trainer.init(params0), x, y, w, length=cfg.steps)
    if finish:
        st = trainer.finish(st, x, y, w)
    return st, st.trajectory


class TrajectoryData(NamedTuple):
    """What trajectory unlearning reads besides the Problem (``Problem.extras["trajectory"]``):
    the buffer, a labelled held-out set never trained on (``x_val``, ``y_val``) and the
    :func:`memorisation_profile` of the buffer on the training set (None: forget set only)."""

    state: TrajectoryState
    x_val: jax.Array
    y_val: jax.Array
    profile: jax.Array | None = None


# =============================================================================
# Pieces of the method
# =============================================================================


def memorisation_gaps(objective: Objective, traj_params: Params, x_forget, y_forget, forget_mask,
                      x_val, y_val) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(m, se, se_val)``, ``[K]`` each, from one forward pass per snapshot ``k`` over the forget
    and held-out sets: ``m[k]`` = mean true-class probability on the (masked) forget set minus
    that on the held-out set; ``se[k]`` the standard error of the forget-set mean (sample
    standard deviation over the masked rows / sqrt(count)); ``se_val[k]`` that of the held-out
    mean, the sampling noise of the training-set gap the rewind rule reads (with 500 held-out
    images ~0.013 once a model fits, as large as the rule's threshold:
    experiments/trajectory/results/rewind_noise/table.md; an estimate, not a bound). ``m`` is
    near 0 before memorisation and grows as training fits the forget set better than unseen data."""

    def gap(p):
        pf = jnp.exp(-objective.losses(p, x_forget, y_forget))
        pv = jnp.exp(-objective.losses(p, x_val, y_val))
        cnt = jnp.maximum(jnp.sum(forget_mask), 1.0)
        mf = jnp.sum(pf * forget_mask) / cnt
        var = jnp.sum(forget_mask * (pf - mf) ** 2) / jnp.maximum(cnt - 1.0, 1.0)
        return mf - jnp.mean(pv), jnp.sqrt(var / cnt), jnp.std(pv, ddof=1) / jnp.sqrt(pv.shape[0])

    return jax.lax.map(gap, traj_params)


def rule_gaps(forget_gaps: jax.Array, forget_se: jax.Array, profile: jax.Array, z: float) -> jax.Array:
    """The gaps the rewind rule reads: the training-set ``profile``, raised where the forget set is
    fit better than a random training subset of its size would be beyond sampling noise
    (``forget_gaps - z * forget_se`` above the profile). Where the profile is unknown (``-inf``)
    the forget set's own gap, without a margin."""
    known = jnp.isfinite(profile)
    return jnp.where(known, jnp.maximum(profile, forget_gaps - z * forget_se), forget_gaps)


@functools.partial(jax.jit, static_argnames=("objective",))
def memorisation_profile(objective: Objective, traj: TrajectoryState, x, y, x_val, y_val) -> jax.Array:
    """The memorisation gap of every snapshot on the whole training set: ``[K]``, computed once
    after training (one forward pass over the training and held-out sets per snapshot). For a
    random forget set its expected gap equals this, with ~``n/r`` times less sampling noise."""
    return memorisation_gaps(objective, traj.params, x, y, jnp.ones((x.shape[0],), jnp.float32), x_val, y_val)[0]


def select_snapshot(gaps: jax.Array, steps: jax.Array, threshold: float) -> jax.Array:
    """Index of the latest written snapshot before the last one with ``gap <= threshold`` (0 if none)."""
    K = gaps.shape[0]
    ok = (gaps <= threshold) & (steps >= 0) & (jnp.arange(K) < K - 1)
    return jnp.max(jnp.where(ok, jnp.arange(K), 0))


def fit_temperature(logits: jax.Array, y: jax.Array, target: jax.Array, iters: int = 40) -> jax.Array:
    """The temperature ``tau >= tau_opt`` with ``mean CE(tau * logits, y) = target``.

    ``mean CE(tau z)`` is convex in ``tau``; ``tau_opt`` minimises it. Over-confidence lies on the
    branch ``tau >= tau_opt``; a target below the minimum gives ``tau_opt``, one above the value at
    ``tau = e^4`` gives ``e^4``. Golden section for ``tau_opt``, then bisection, in ``log tau``.
    """
    f = lambda lt: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(jnp.exp(lt) * logits, y))
    g = (np.sqrt(5.0) - 1.0) / 2.0

    def golden(_, ab):
        a, b = ab
        c, d = b - g * (b - a), a + g * (b - a)
        return jnp.where(f(c) < f(d), jnp.stack([a, d]), jnp.stack([c, b]))

    a, b = jax.lax.fori_loop(0, iters, golden, jnp.asarray([-4.0, 4.0], logits.dtype))
    lo0 = (a + b) / 2

    def bisect(_, lh):
        lo, hi = lh
        mid = (lo + hi) / 2
        return jnp.where(f(mid) < target, jnp.stack([mid, hi]), jnp.stack([lo, mid]))

    lo, hi = jax.lax.fori_loop(0, iters, bisect, jnp.stack([lo0, jnp.asarray(4.0, logits.dtype)]))
    lt = jnp.where(target <= f(lo0), lo0, (lo + hi) / 2)
    return jnp.exp(lt)


def calibrate(objective: Objective, params: Params, reference: Params, x_val, y_val,
              head: str | tuple[str, ...] | None = None) -> tuple[Params, jax.Array]:
    """``(params', tau)``: ``params`` with its head -- the parameter group that produces the
    logits, named by ``head`` (a key path, or one top-level key) or, when None, found from the
    model (:func:`~mini_unlearn_jax.core.adapters.find_head`, eagerly: not under ``jit``) --
    scaled by the temperature that makes its mean held-out loss on ``(x_val, y_val)`` that of
    ``reference`` (:func:`fit_temperature`; predictions unchanged)."""
    if head is None:
        head = find_head(objective.apply_fn, params, x_val)
    target = jnp.mean(objective.losses(reference, x_val, y_val))
    tau = fit_temperature(objective.logits(params, x_val), y_val, target)
    return scale_group(params, head, tau), tau


def keep_batches(key: jax.Array, keep: jax.Array, steps: int, batch_size: int) -> jax.Array:
    """Mini-batch indices ``[steps, batch_size]``: epochs over the kept rows (``keep > 0``) in a
    fresh random order per epoch (fixed shapes for any number of kept rows)."""
    n = keep.shape[0]
    n_keep = jnp.maximum(jnp.sum(keep > 0), 1).astype(jnp.int32)
    per_epoch = jnp.maximum(n_keep // batch_size, 1)

    def one(t):
        e, b = t // per_epoch, t % per_epoch
        u = jax.random.uniform(jax.random.fold_in(key, e), (n,)) + 2.0 * (keep <= 0)
        return jnp.argsort(u)[(b * batch_size + jnp.arange(batch_size)) % n_keep]

    return jax.lax.map(one, jnp.arange(steps))


def phase_optimizer(cfg: TrainConfig, learning_rate) -> optax.GradientTransformation:
    """The optimizer of the retraining phase for the recipe ``cfg``: the library's Adam at
    ``learning_rate`` (a float or an optax schedule) for the built-in recipes, the user's factory
    called with it, or the user's ``GradientTransformation`` as it is (``learning_rate`` unused:
    it carries its own schedule)."""
    if isinstance(cfg.optimizer, optax.GradientTransformation):
        return cfg.optimizer
    if callable(cfg.optimizer):
        return cfg.optimizer(learning_rate)
    return optax.adam(learning_rate)


def retrain_phase(objective: Objective, params: Params, x, y, keep, key, *, steps: int, batch_size: int,
                  optimizer: optax.GradientTransformation, loss_fn=None,
                  record: tuple[TrajectoryState, jax.Array] | None = None):
    """``steps`` steps of ``optimizer`` (fresh state) on mini-batches of the kept rows;
    ``loss_fn(params, xb, yb)`` defaults to the objective's batch loss + penalty.

    ``record = (state, write_at)``: also write the parameters after phase step ``t`` (1-based) into
    slot ``i`` of the trajectory buffer ``state`` where ``write_at[i] == t`` (0: never). Returns the
    parameters, or ``(parameters, state)`` with ``record``."""
    opt = optimizer
    loss_fn = loss_fn or (lambda p, xb, yb: objective.data_loss(p, xb, yb) + objective.penalty(p))
    idx = keep_batches(key, keep, steps, batch_size)
    trace, write_at = record if record is not None else (None, None)

    def body(c, ti):
        p, s, tr = c
        t, bi = ti
        u, s = opt.update(jax.grad(loss_fn)(p, x[bi], y[bi]), s, p)
        p = optax.apply_updates(p, u)
        if tr is not None:
            hit = write_at == t + 1
            tr = jax.lax.cond(jnp.any(hit), lambda tr: put_slot(tr, jnp.argmax(hit), p), lambda tr: tr, tr)
        return (p, s, tr), None

    (p, _, trace), _ = jax.lax.scan(body, (params, opt.init(params), trace), (jnp.arange(steps), idx))
    return p if record is None else (p, trace)


def put_slot(state: TrajectoryState, i, params: Params) -> TrajectoryState:
    """``state`` with slot ``i``'s parameters replaced by ``params`` (its step label unchanged)."""
    return state._replace(params=jax.tree.map(lambda b, v: b.at[i].set(v.astype(b.dtype)), state.params, params))


def phase_schedule(steps: jax.Array, k, phase_len: int) -> jax.Array:
    """``[K]``: the retraining phase step (1-based) at which slot ``j > k`` of the unlearned run's
    trajectory is written, 0 for the slots ``j <= k`` kept from the original.

    Slot ``j`` takes the place in the phase that its step held in the original stretch from the
    rewind point on: ``round((s_j - s_k) / (s_{K-1} - s_k) * phase_len)``, at least 1, made strictly
    increasing (``cummax(p_j - j) + j``) and at most ``phase_len - (K-1-j)``, so the last slot is
    the phase's last step. With fewer phase steps than slots to fill, the earliest of them get
    positions ``<= 0`` and are never written (they keep the rewind snapshot)."""
    K = steps.shape[0]
    j = jnp.arange(K)
    sk = steps[k]
    frac = (steps - sk) / jnp.maximum(steps[K - 1] - sk, 1)
    p = jnp.maximum(jnp.round(frac * phase_len).astype(jnp.int32), 1)
    after = j > k
    q = jax.lax.cummax(jnp.where(after, p - j, jnp.iinfo(jnp.int32).min // 2)) + j
    return jnp.where(after, jnp.minimum(q, phase_len - (K - 1 - j)), 0)


def rewound_trajectory(traj: TrajectoryState, k, start: Params, write_at: jax.Array) -> TrajectoryState:
    """The trajectory the retraining phase fills: slots ``<= k`` as they were, every later slot
    reset to the rewind snapshot ``start`` (no parameter of the original trajectory after the rewind
    point survives, even in a slot the phase never reaches) with step label ``s_k + write_at``,
    and a zero optimizer state there (the phase's Adam state is not the recipe's)."""
    after = jnp.arange(traj.steps.shape[0]) > k

    def reset(buf, v):
        m = after.reshape((-1,) + (1,) * (buf.ndim - 1))
        return jnp.where(m, jnp.broadcast_to(jnp.asarray(v, buf.dtype), buf.shape), buf)

    zero = lambda buf: jnp.where(after.reshape((-1,) + (1,) * (buf.ndim - 1)), jnp.zeros_like(buf), buf)
    steps = jnp.where(after, traj.steps[k] + jnp.maximum(write_at, 0), traj.steps)
    return TrajectoryState(steps, jax.tree.map(reset, traj.params, start), jax.tree.map(zero, traj.opt_state))


# =============================================================================
# The method
# =============================================================================


@dataclasses.dataclass(frozen=True)
class TrajectoryConfig:
    """Knobs of trajectory unlearning, each fixed once on one setting at seed 0 and 10 % removal
    (threshold and peak learning rate on the leaky MLP, budget on the 10,000-image MLP).

    Attributes:
      threshold: rewind to the latest snapshot whose memorisation gap (the training set's
        profile, or the forget set's gap where that is larger beyond ``noise_z`` standard errors)
        is at most this.
      noise_z: the margin, in standard errors of the forget-set mean, by which the forget set's
        gap must exceed the profile to override it (2: the conventional two-standard-error
        margin, not tuned). Without it a small random forget set (100 examples) rewinds to an
        early snapshot on sampling noise alone.
      budget: retraining steps as a fraction of the recipe's steps (0.15 of 1,600 = 240). Chosen
        on the 10,000-image MLP (recipes "fidelity-mlp"), seed 0, 10 % removal: the smallest of
        0.075 / 0.1 / 0.125 / 0.15 whose test accuracy is not below retraining's
        (``python experiments/trajectory_budget/run.py``); 0.075, read on the leaky MLP, left that
        model 1.2-2.7 points below retraining.
      peak_lr_scale: one-cycle peak learning rate as a multiple of the recipe's.
      calibrate: scale the output logits to the original model's held-out loss.
      max_eval: the forget set is subsampled to at most this many examples for the gaps.
      head: the parameter group that produces the logits, as a key path (``("head",)``) or one
        top-level key; None: found from the model by probing it
        (:func:`~mini_unlearn_jax.core.adapters.find_head`), never from the order of the dict.
      seed: seeds the mini-batch order and the forget-set subsample.
      rewind_at: if set, skip the rule and rewind to the latest snapshot at or before this step
        (for ablations).
    """

    threshold: float = 0.01
    noise_z: float = 2.0
    budget: float = 0.15
    peak_lr_scale: float = 8.0
    calibrate: bool = True
    max_eval: int = 256
    head: str | tuple[str, ...] | None = None
    seed: int = 0
    rewind_at: int | None = None

    def __post_init__(self):
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must lie in (0, 1], got {self.budget}")
        if self.peak_lr_scale <= 0 or self.max_eval < 1:
            raise ValueError("peak_lr_scale and max_eval must be positive")
        if self.noise_z < 0:
            raise ValueError(f"noise_z must be >= 0, got {self.noise_z}")


class TrajectoryResult(NamedTuple):
    """``params``; the snapshot it restarted from (``rewind_index``, ``rewind_step``); the
    memorisation gap of every snapshot (``gaps [K]``); the temperature ``tau`` (1 when not
    calibrated); ``steps`` of retraining; ``finite``: whether the result is finite; ``gap_se [K]``:
    the held-out standard error of the gaps (:func:`memorisation_gaps`); ``trajectory``: the unlearned
    model's own trajectory buffer (slots up to the rewind point kept, the later ones written along
    the retraining phase on the same schedule, the last one ``params``: :func:`phase_schedule`)."""

    params: Params
    rewind_index: jax.Array
    rewind_step: jax.Array
    gaps: jax.Array
    tau: jax.Array
    steps: int
    finite: jax.Array
    gap_se: jax.Array
    trajectory: TrajectoryState


def phase_steps(cfg: TrainConfig, config: TrajectoryConfig) -> int:
    return max(1, int(round(config.budget * cfg.steps)))


@functools.partial(jax.jit, static_argnames=("objective", "cfg", "config"))
def trajectory_unlearn(objective: Objective, cfg: TrainConfig, config: TrajectoryConfig, traj: TrajectoryState,
                       profile: jax.Array, params: Params, x, y, keep, forget_idx, forget_mask, x_val,
                       y_val) -> TrajectoryResult:
    """Unlearn the rows with ``keep == 0`` (one jitted call; see the module docstring).

    Args:
      objective, cfg: the training objective and recipe (batch size, steps, learning rate).
      config: :class:`TrajectoryConfig` (static).
      traj: the trajectory buffer from :func:`train_with_trajectory`.
      profile: :func:`memorisation_profile` of the buffer ``[K]`` (``-inf`` entries: forget set only).
      params: the trained ``w*`` (calibration target).
      x, y, keep: the training set and its 0/1 mask of remaining rows ``[n]``.
      forget_idx, forget_mask: removed rows (a subsample of at most ``max_eval``) padded to a
        fixed size, and the 0/1 mask of real entries -- see :func:`forget_sample`.
      x_val, y_val: a labelled held-out set (never trained on).
    """
    xf, yf = x[forget_idx], y[forget_idx]
    fgaps, fse, gse = memorisation_gaps(objective, traj.params, xf, yf, forget_mask, x_val, y_val)
    gaps = rule_gaps(fgaps, fse, profile, config.noise_z)
    if config.rewind_at is None:
        k = select_snapshot(gaps, traj.steps, config.threshold)
    else:
        k = jnp.max(jnp.where((traj.steps <= config.rewind_at) & (traj.steps >= 0), jnp.arange(gaps.shape[0]), 0))
    start = snapshot(traj, k)
    steps = phase_steps(cfg, config)
    lr = optax.cosine_onecycle_schedule(steps, config.peak_lr_scale * cfg.learning_rate)
    write_at = phase_schedule(traj.steps, k, steps)
    record = (rewound_trajectory(traj, k, start, write_at), write_at)
    out, trace = retrain_phase(objective, start, x, y, keep, jax.random.key(config.seed), steps=steps,
                               batch_size=cfg.batch_size, optimizer=phase_optimizer(cfg, lr), record=record)
    tau = jnp.ones((), jnp.float32)
    if config.calibrate:
        out, tau = calibrate(objective, out, params, x_val, y_val, config.head)
    trace = put_slot(trace, traj.steps.shape[0] - 1, out)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(out)]))
    return TrajectoryResult(out, k, traj.steps[k], gaps, tau, steps, finite, gse, trace)


def forget_sample(forget, n: int, max_eval: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_eval`` of the forget indices (a seeded subsample), padded to ``max_eval``, and
    the 0/1 mask of real entries: the fixed shape the gaps are computed on."""
    idx = np.unique(np.asarray(forget)).astype(np.int32)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"forget indices must be non-empty and lie in [0, {n})")
    if idx.size > max_eval:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_eval, replace=False))
    pad = np.zeros(max_eval, np.int32)
    pad[: idx.size] = idx
    mask = np.zeros(max_eval, np.float32)
    mask[: idx.size] = 1.0
    return pad, mask


# =============================================================================
# Method runners (MethodOutput with compile time apart) and baselines
# =============================================================================


def run_trajectory(problem, forget, *, trajectory: TrajectoryState, x_val, y_val, profile=None,
                   config: TrajectoryConfig = TrajectoryConfig()):
    """Trajectory unlearning of ``forget`` on a :class:`~mini_unlearn_jax.core.methods.Problem`.

    Needs, besides the problem (objective, mini-batch recipe, ``w*``, training set), the
    trajectory buffer of :func:`train_with_trajectory`, its :func:`memorisation_profile` (computed
    once after training; None: the rule looks at the forget set only) and a labelled held-out
    set. A non-finite result is reported as not converged and ``w*`` is returned.
    """
    n = int(problem.x.shape[0])
    cfg = problem.train_config
    if config.calibrate and config.head is None:  # the jitted program needs the head as a static path
        config = dataclasses.replace(config, head=find_head(problem.objective.apply_fn, problem.params, x_val))
    fidx, fmask = forget_sample(forget, n, config.max_eval, config.seed)
    K = int(trajectory.steps.shape[0])
    prof = jnp.full((K,), -jnp.inf, jnp.float32) if profile is None else jnp.asarray(profile, jnp.float32)
    dyn = (trajectory, prof, problem.params, problem.x, problem.y, jnp.asarray(keep_mask(n, forget)), jnp.asarray(fidx),
           jnp.asarray(fmask), jnp.asarray(x_val), jnp.asarray(y_val))
    compiled, c = aot(trajectory_unlearn, (problem.objective, cfg, config), dyn)
    res, t = timed(compiled, *dyn)
    ok = bool(res.finite)
    info = {"rewind_step": int(res.rewind_step), "rewind_index": int(res.rewind_index),
            "gaps": [float(v) for v in np.asarray(res.gaps)], "tau": float(res.tau), "steps": res.steps,
            "snapshot_steps": [int(s) for s in np.asarray(trajectory.steps)], "budget": config.budget,
            "gap_se": [float(v) for v in np.asarray(res.gap_se)],
            "head": None if config.head is None else list(np.atleast_1d(config.head).tolist())}
    k = info["rewind_index"]
    reason = (f"rewound to step {info['rewind_step']} (memorisation gap {info['gaps'][k]:+.3f}, held-out "
              f"standard error {info['gap_se'][k]:.3f}, threshold {config.threshold:g}), retrained {res.steps} "
              f"steps, tau {info['tau']:.3g}"
              if ok else "the retraining phase produced NaN/inf; the original parameters are returned")
    return MethodOutput(res.params if ok else problem.params, ok, reason, t, c, info,
                        {"trajectory": res.trajectory} if ok else None)


# =============================================================================
# Registry glue: the `trajectory` method, and what `mini` runs on a Problem with a trajectory
# =============================================================================


def needs_trajectory(problem) -> str | None:
    """Why trajectory unlearning does not apply to ``problem`` (None: it does)."""
    if "trajectory" not in problem.extras:
        return ("it reads a trajectory buffer kept during training, and this model kept none: thread "
                "trajectory_buffer(log_schedule(steps, 12)) through your training loop (or train with "
                "Trainer(..., trajectory=...); `mini-unlearn train --model mlp` keeps one) and pass it to "
                "make_problem(..., trajectory=buffer, heldout=(x_val, y_val))")
    cfg = problem.recipe
    if cfg is None or cfg.batch_size is None or cfg.optimizer == "lbfgs":
        return ("it retrains with the recipe's mini-batch optimizer, so the recipe must be a mini-batch "
                "TrainConfig (adam, sgd or your own optax optimizer, with batch_size and steps)")
    return None


def run_from_problem(problem, forget, **options) -> MethodOutput:
    """:func:`run_trajectory` with the TrajectoryData in ``problem.extras["trajectory"]``;
    ``options`` are :class:`TrajectoryConfig` fields."""
    data: TrajectoryData = problem.extras["trajectory"]
    unknown = set(options) - {f.name for f in dataclasses.fields(TrajectoryConfig)}
    if unknown:
        raise ValueError(f"unknown trajectory options {sorted(unknown)}: choose from "
                         f"{', '.join(f.name for f in dataclasses.fields(TrajectoryConfig))}")
    out = run_trajectory(problem, forget, trajectory=data.state, x_val=data.x_val, y_val=data.y_val,
                         profile=data.profile, config=TrajectoryConfig(**options))
    return out._replace(info={**out.info, "solver": "trajectory"})


def initial_only(state: TrajectoryState) -> TrajectoryState:
    """The trajectory an unlearned model keeps when its method rebuilt none (fine-tuning, gradient
    ascent, the fixed point, ...): the initialisation (slot 0, step 0) and nothing of the trained
    trajectory after it -- every other slot is emptied (step -1, zeros) and the last one is set
    to the new model by :func:`refresh_program`. The next request then rewinds to the
    initialisation."""
    K = state.steps.shape[0]
    later = (jnp.arange(K) > 0).astype(bool)
    empty = lambda buf: jnp.where(later.reshape((-1,) + (1,) * (buf.ndim - 1)), jnp.zeros_like(buf), buf)
    steps = jnp.where(later, -1, state.steps).at[K - 1].set(state.steps[K - 1])
    return TrajectoryState(steps, jax.tree.map(empty, state.params), jax.tree.map(empty, state.opt_state))


@functools.partial(jax.jit, static_argnames=("objective",))
def refresh_program(objective: Objective, state: TrajectoryState, params, x, y, x_val, y_val):
    """The unlearned model's trajectory for the next request: ``state`` (the one its method
    rebuilt, or :func:`initial_only`) with the last slot set to ``params``, and its
    :func:`memorisation_profile` on the remaining data ``(x, y)`` -- one forward pass per snapshot."""
    state = put_slot(state, state.steps.shape[0] - 1, params)
    return state, memorisation_profile(objective, state, x, y, x_val, y_val)
