"""DeltaGrad (Wu, Dobriban, Davidson, ICML 2020): rapid retraining by replaying cached GD steps.

Training with plain (S)GD at a fixed learning rate caches, at every step ``t``, the
iterate ``w_t`` and the batch gradient ``g_t`` (data term only, mean over the batch;
the L2 term ``objective.penalty_grad`` is added exactly wherever it is needed).
Unlearning replays the ``T`` steps from the same initial parameters on the same batch
schedule with the removed examples dropped:

- at *exact* steps (``t < j0`` or ``(t - j0) % T0 == 0``) the gradient on the remaining
  examples of the batch is computed at the current iterate ``v_t``, and a curvature pair
  ``s = v_t - w_t``, ``y = grad_batch(v_t) - g_t + lam * s`` is recorded, where
  ``grad_batch`` is the gradient over the *whole* original batch (remaining and removed),
  so ``y`` is a secant of the full-batch objective's gradient, as in the paper and in the
  authors' code; the newest ``m`` pairs are kept;
- at the other steps the whole-batch gradient at ``v_t`` is modelled as
  ``g_t + lam * w_t + B (v_t - w_t)`` with ``B`` the compact L-BFGS matrix
  (Byrd, Nocedal and Schnabel 1994) of the stored pairs, and the removed examples'
  exact gradients at ``v_t`` are subtracted:
  ``g~ = [b (g_t + lam w_t + B s) - (sum_{i in R_t} grad l_i(v_t) + r_t lam v_t)] / (b - r_t)``.

The batch schedule is :func:`mini_unlearn_jax.core.training.batch_indices`, the one of ``Trainer``
(epoch-wise permutation from ``fold_in(key(seed), epoch)``, last batch padded), and a
batch's loss is the mean over its kept examples, so :func:`retrain` with a removal mask
runs exactly the recipe that ``Trainer`` with ``optimizer="sgd"`` runs.

Everything is jitted: training is one ``lax.scan``; the replay is one ``lax.scan`` with a
fixed-size pair buffer and a validity mask, exact vs approximate picked by ``lax.cond``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .linalg import lbfgs_product
from .models import Objective
from .training import batch_indices

Params = Any
Array = jax.Array

MIN_SIGMA = 1e-3  # floor of the L-BFGS initial scaling, as ``mini_sigma`` in the authors' code


@dataclasses.dataclass(frozen=True)
class DeltaGradConfig:
    """A plain (S)GD recipe and DeltaGrad's replay hyperparameters.

    Attributes:
      lr: fixed learning rate.
      steps: number of steps ``T``.
      batch_size: ``None`` for full-batch GD, else the mini-batch size.
      seed: seeds the mini-batch order (same scheme as ``Trainer``).
      m: number of curvature pairs kept for the L-BFGS model.
      T0: period of exact steps after the burn-in.
      j0: burn-in: every step ``t < j0`` is exact.
    """

    lr: float
    steps: int
    batch_size: int | None = None
    seed: int = 0
    m: int = 2
    T0: int = 5
    j0: int = 10

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.steps < 1 or self.m < 1 or self.T0 < 1 or self.j0 < 0:
            raise ValueError("steps, m and T0 must be positive and j0 non-negative")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


class DeltaGradCache(NamedTuple):
    """The training history: ``params[T, dim]`` (``w_t`` before step ``t``) and
    ``grads[T, dim]`` (batch data gradient ``g_t`` at ``w_t``, no L2 term), flattened
    with ``jax.flatten_util.ravel_pytree`` of the parameters."""

    params: Array
    grads: Array


class DeltaGradInfo(NamedTuple):
    """What a replay did.

    Attributes:
      exact_steps: steps whose gradient was computed exactly (burn-in, periodic, and
        steps with no usable curvature pair yet).
      steps: total number of replayed steps ``T``.
      pairs_skipped: exact steps whose pair failed the curvature test ``s^T y > 0``
        (e.g. ``s = 0`` before the first removed example is met) and was not stored.
      cache_nbytes: memory of the training cache in bytes.
      finite: whether every iterate of the replay stayed finite.
    """

    exact_steps: int
    steps: int
    pairs_skipped: int
    cache_nbytes: int
    finite: bool


def cache_nbytes(cache: DeltaGradCache) -> int:
    """Bytes held by the cache (``2 * T * dim`` numbers)."""
    return int(cache.params.nbytes + cache.grads.nbytes)


# -- training ----------------------------------------------------------------------------------


def _flat_penalty_grad(objective: Objective, unravel, v: Array) -> Array:
    return ravel_pytree(objective.penalty_grad(unravel(v)))[0]


def _batch_data_grad(objective: Objective, unravel, v: Array, xb: Array, yb: Array, wb: Array) -> Array:
    """Flat gradient of the weighted-mean data loss of one batch."""
    return ravel_pytree(jax.grad(objective.data_loss)(unravel(v), xb, yb, wb))[0]


@functools.partial(jax.jit, static_argnames=("objective", "cfg", "record"))
def train_program(objective: Objective, cfg: DeltaGradConfig, params0: Params, x: Array, y: Array,
                  weights: Array, record: bool):
    flat0, unravel = ravel_pytree(params0)
    n = x.shape[0]

    def body(w, t):
        idx, real = batch_indices(t, n, cfg.batch_size, cfg.seed)
        wb = jnp.where(real, weights[idx], 0.0)
        g = _batch_data_grad(objective, unravel, w, x[idx], y[idx], wb)
        w_new = w - cfg.lr * (g + _flat_penalty_grad(objective, unravel, w))
        return w_new, ((w, g) if record else None)

    w_final, hist = jax.lax.scan(body, flat0, jnp.arange(cfg.steps))
    return unravel(w_final), hist


def _as_arrays(x, y) -> tuple[Array, Array]:
    return jnp.asarray(x), jnp.asarray(y)


def train_with_cache(objective: Objective, cfg: DeltaGradConfig, params0: Params, x, y
                     ) -> tuple[Params, DeltaGradCache]:
    """Train with plain (S)GD on all of ``(x, y)`` and cache ``w_t``, ``g_t`` at every step.

    Args:
      objective: the objective (data term + ``objective.penalty``).
      cfg: the recipe.
      params0: initial parameters.
      x, y: training set, ``[n, ...]`` and ``[n]``.

    Returns:
      ``(w_T, cache)``; ``cache_nbytes(cache)`` is its memory.
    """
    x, y = _as_arrays(x, y)
    weights = jnp.ones((x.shape[0],), jnp.float32)
    params, (ws, gs) = train_program(objective, cfg, params0, x, y, weights, record=True)
    return params, DeltaGradCache(ws, gs)


def retrain(objective: Objective, cfg: DeltaGradConfig, params0: Params, x, y, remove_mask=None) -> Params:
    """The same (S)GD recipe (init, steps, batch order) with the removed examples masked out.

    Args:
      remove_mask: ``[n]`` bool, True for removed examples (``None``: remove nothing).

    Returns:
      The retrained parameters ``w_R``.
    """
    x, y = _as_arrays(x, y)
    n = x.shape[0]
    keep = jnp.ones((n,), bool) if remove_mask is None else ~jnp.asarray(remove_mask, bool)
    params, _ = train_program(objective, cfg, params0, x, y, keep.astype(jnp.float32), record=False)
    return params


# -- unlearning ----------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("objective", "cfg", "k_max"))
def _replay(objective: Objective, cfg: DeltaGradConfig, cache: DeltaGradCache, params0: Params,
            x: Array, y: Array, remove_mask: Array, k_max: int):
    flat0, unravel = ravel_pytree(params0)
    n, dim, m = x.shape[0], flat0.shape[0], cfg.m
    dtype = flat0.dtype

    def pen(v):
        return _flat_penalty_grad(objective, unravel, v)

    def body(carry, inp):
        v, S, Y, valid, finite = carry
        t, w_t, g_t = inp
        idx, real = batch_indices(t, n, cfg.batch_size, cfg.seed)
        removed = real & remove_mask[idx]
        kept = real & ~remove_mask[idx]
        b = jnp.sum(real).astype(dtype)
        r_int = jnp.sum(removed)
        r = r_int.astype(dtype)
        bk = b - r
        # The removed examples of the batch, gathered into k_max slots.
        (slot,) = jnp.nonzero(removed, size=k_max, fill_value=0)
        rmask = (jnp.arange(k_max) < r_int).astype(dtype)
        ridx = idx[slot]
        vp = unravel(v)
        g_rem_sum = ravel_pytree(jax.grad(
            lambda p: jnp.sum(rmask * objective.losses(p, x[ridx], y[ridx])))(vp))[0]
        s = v - w_t
        scheduled = (t < cfg.j0) | ((t - cfg.j0) % cfg.T0 == 0)
        is_exact = scheduled | ~jnp.any(valid)

        def exact(_):
            g_keep = _batch_data_grad(objective, unravel, v, x[idx], y[idx], kept.astype(dtype))
            # Whole-batch gradient at v; bitwise g_keep when nothing in the batch is removed,
            # so that s = 0, y = 0 (no pair) until the replay first meets a removed example.
            g_batch = jnp.where(r > 0, (bk * g_keep + g_rem_sum) / b, g_keep)
            y_new = g_batch - g_t + pen(s)
            store = jnp.vdot(s, y_new) > 0
            S2 = jnp.where(store, jnp.roll(S, -1, axis=0).at[-1].set(s), S)
            Y2 = jnp.where(store, jnp.roll(Y, -1, axis=0).at[-1].set(y_new), Y)
            valid2 = jnp.where(store, jnp.roll(valid, -1).at[-1].set(True), valid)
            return g_keep + pen(v), S2, Y2, valid2, ~store

        def approx(_):
            batch_est = g_t + pen(w_t) + lbfgs_product(S, Y, s, valid, scale="sy/ss", min_scale=MIN_SIGMA)
            pv = pen(v)
            g = (b * batch_est - (g_rem_sum + r * pv)) / jnp.maximum(bk, 1.0)
            # A batch left empty contributes no data term (Trainer's convention).
            g = jnp.where(bk > 0, g, pv)
            return g, S, Y, valid, jnp.zeros((), bool)

        g, S, Y, valid, skipped = jax.lax.cond(is_exact, exact, approx, None)
        v_new = v - cfg.lr * g
        finite = finite & jnp.all(jnp.isfinite(v_new))
        return (v_new, S, Y, valid, finite), (is_exact, skipped)

    init = (flat0, jnp.zeros((m, dim), dtype), jnp.zeros((m, dim), dtype),
            jnp.zeros((m,), bool), jnp.ones((), bool))
    (v, _, _, _, finite), (exact, skipped) = jax.lax.scan(
        body, init, (jnp.arange(cfg.steps), cache.params, cache.grads))
    return unravel(v), jnp.sum(exact), jnp.sum(skipped), finite


def _bucket(k: int) -> int:
    """Next power of two >= k (>= 1), to bound recompilations across request sizes."""
    return 1 << max(0, int(k) - 1).bit_length()


def deltagrad_unlearn(objective: Objective, cfg: DeltaGradConfig, cache: DeltaGradCache,
                      params0: Params, x, y, remove_mask) -> tuple[Params, DeltaGradInfo]:
    """Remove the examples flagged in ``remove_mask`` by DeltaGrad's replay of the training steps.

    Args:
      objective, cfg: exactly those used by :func:`train_with_cache`.
      cache: the training cache.
      params0: the initial parameters of training.
      x, y: the full training set (removed examples included).
      remove_mask: ``[n]`` bool, True for the examples to remove.

    Returns:
      ``(params, info)``: the approximation of :func:`retrain`'s result and a
      :class:`DeltaGradInfo`. Check ``info.finite``: a diverged replay is reported, not hidden.
    """
    x, y = _as_arrays(x, y)
    if cache.params.shape[0] != cfg.steps:
        raise ValueError(f"cache holds {cache.params.shape[0]} steps, cfg.steps is {cfg.steps}")
    mask_np = np.asarray(remove_mask, bool)
    if mask_np.shape != (x.shape[0],):
        raise ValueError(f"remove_mask must have shape ({x.shape[0]},), got {mask_np.shape}")
    per_batch = x.shape[0] if cfg.batch_size is None else cfg.batch_size
    k_max = _bucket(min(int(mask_np.sum()), per_batch))
    params, n_exact, n_skipped, finite = _replay(
        objective, cfg, cache, params0, x, y, jnp.asarray(mask_np), k_max=k_max)
    info = DeltaGradInfo(exact_steps=int(n_exact), steps=cfg.steps, pairs_skipped=int(n_skipped),
                         cache_nbytes=cache_nbytes(cache), finite=bool(finite))
    return params, info
