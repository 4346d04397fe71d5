"""DeltaGrad: exactness with T0=1, accuracy at a small deletion ratio, the L-BFGS product."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from mini_unlearn_jax.app.data import synthetic
from mini_unlearn_jax.core.deltagrad import (
    MIN_SIGMA,
    DeltaGradConfig,
    batch_indices,
    cache_nbytes,
    deltagrad_unlearn,
    retrain,
    train_with_cache,
)
from mini_unlearn_jax.core.linalg import lbfgs_product
from mini_unlearn_jax.core.models import build_model, init_params, make_objective
from mini_unlearn_jax.core.training import TrainConfig, Trainer

N = 300


@pytest.fixture(scope="module")
def problem():
    ds = synthetic(n=N, d=10, classes=3)
    model = build_model("logreg", 3)
    objective = make_objective(model, l2=1e-2)
    params0 = init_params(model, ds.x_train[0], 0)
    return objective, params0, ds.x_train, ds.y_train


def _removal(ratio: float, seed: int) -> np.ndarray:
    mask = np.zeros(N, bool)
    mask[np.random.default_rng(seed).choice(N, round(ratio * N), replace=False)] = True
    return mask


def _dist(a, b) -> float:
    return float(jnp.linalg.norm(ravel_pytree(a)[0] - ravel_pytree(b)[0]))


def test_schedule_matches_trainer(problem):
    """retrain() runs Trainer's SGD recipe: same batch order, padding and masking."""
    objective, params0, x, y = problem
    cfg = DeltaGradConfig(lr=0.2, steps=30, batch_size=64, seed=3)  # 300 = 4*64 + 44: padded
    mask = _removal(0.05, 0)
    ours = retrain(objective, cfg, params0, x, y, mask)
    tcfg = TrainConfig(optimizer="sgd", learning_rate=cfg.lr, steps=cfg.steps, batch_size=cfg.batch_size,
                       seed=cfg.seed, snapshot_every=10**6, chunk=cfg.steps)
    theirs = Trainer(objective, tcfg).fit(params0, x, y, (~mask).astype(np.float32)).params
    assert _dist(ours, theirs) < 1e-5
    # every example appears once per epoch
    batches = [batch_indices(jnp.asarray(t), N, 64, 3) for t in range(5)]
    idx = np.concatenate([np.asarray(i)[np.asarray(real)] for i, real in batches])
    assert sorted(idx.tolist()) == list(range(N))


@pytest.mark.parametrize("batch_size,lr,steps", [(None, 0.5, 60), (64, 0.2, 60)])
def test_all_exact_steps_equal_retraining(problem, batch_size, lr, steps):
    """(a) With T0=1 every step is exact, so DeltaGrad is retraining on D \\ R."""
    objective, params0, x, y = problem
    cfg = DeltaGradConfig(lr=lr, steps=steps, batch_size=batch_size, T0=1, j0=0)
    w_star, cache = train_with_cache(objective, cfg, params0, x, y)
    mask = _removal(0.05, 1)
    w_r = retrain(objective, cfg, params0, x, y, mask)
    w_dg, info = deltagrad_unlearn(objective, cfg, cache, params0, x, y, mask)
    assert info.exact_steps == steps and info.finite
    assert _dist(w_star, w_r) > 1e-2  # the removal matters
    assert _dist(w_dg, w_r) < 1e-5


@pytest.mark.parametrize("batch_size,lr,steps,bound", [(None, 0.5, 100, 0.05), (100, 0.2, 150, 0.2)])
def test_small_deletion_close_to_retraining(problem, batch_size, lr, steps, bound):
    """(b) At r/n = 1% with the paper's defaults (m=2, T0=5, j0=10), w_DG is near w_R."""
    objective, params0, x, y = problem
    cfg = DeltaGradConfig(lr=lr, steps=steps, batch_size=batch_size, seed=3)
    w_star, cache = train_with_cache(objective, cfg, params0, x, y)
    dim = ravel_pytree(params0)[0].size
    assert cache_nbytes(cache) == 2 * steps * dim * cache.params.dtype.itemsize
    scheduled = sum(t < cfg.j0 or (t - cfg.j0) % cfg.T0 == 0 for t in range(steps))
    for seed in (0, 1):
        mask = _removal(0.01, seed)
        w_r = retrain(objective, cfg, params0, x, y, mask)
        w_dg, info = deltagrad_unlearn(objective, cfg, cache, params0, x, y, mask)
        assert info.finite and info.cache_nbytes == cache_nbytes(cache)
        assert scheduled <= info.exact_steps < steps // 2
        assert _dist(w_dg, w_r) < bound * _dist(w_star, w_r)


def test_no_removal_returns_trained_params(problem):
    """Nothing removed: every replayed iterate equals the cached one (no pair is ever stored)."""
    objective, params0, x, y = problem
    cfg = DeltaGradConfig(lr=0.2, steps=40, batch_size=100)
    w_star, cache = train_with_cache(objective, cfg, params0, x, y)
    w_dg, info = deltagrad_unlearn(objective, cfg, cache, params0, x, y, np.zeros(N, bool))
    assert _dist(w_dg, w_star) < 1e-6 and info.finite


def _dense_bfgs(S: np.ndarray, Y: np.ndarray, min_sigma: float = 1e-3) -> np.ndarray:
    """Recursive BFGS updates of sigma*I, oldest pair first (float64 oracle)."""
    s, yv = S[-1], Y[-1]
    sigma = max(float(yv @ s / (s @ s)), min_sigma)
    B = sigma * np.eye(S.shape[1])
    for s, yv in zip(S, Y, strict=True):
        Bs = B @ s
        B = B - np.outer(Bs, Bs) / (s @ Bs) + np.outer(yv, yv) / (yv @ s)
    return B


@pytest.mark.parametrize("m,dim,seed", [(1, 6, 0), (2, 12, 1), (4, 12, 2)])
def test_lbfgs_hvp_matches_dense_bfgs(m, dim, seed):
    """(c) The compact form equals m recursive BFGS updates; invalid pairs are ignored."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(dim, dim))
    H = A @ A.T / dim + 0.1 * np.eye(dim)
    S = rng.normal(size=(m, dim))
    Y = S @ H + 0.05 * rng.normal(size=(m, dim))
    assert np.all(np.einsum("ij,ij->i", S, Y) > 0)
    v = rng.normal(size=dim)
    expected = _dense_bfgs(S, Y) @ v
    hvp = jax.jit(functools.partial(lbfgs_product, scale="sy/ss", min_scale=MIN_SIGMA))
    got = np.asarray(hvp(jnp.asarray(S, jnp.float32), jnp.asarray(Y, jnp.float32),
                         jnp.asarray(v, jnp.float32)))
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
    # garbage in invalid slots (oldest and one extra) changes nothing
    Sx = np.concatenate([rng.normal(size=(1, dim)), S, rng.normal(size=(1, dim))])
    Yx = np.concatenate([-rng.normal(size=(1, dim)), Y, rng.normal(size=(1, dim))])
    valid = jnp.asarray([False] + [True] * m + [False])
    got_masked = np.asarray(hvp(jnp.asarray(Sx, jnp.float32), jnp.asarray(Yx, jnp.float32),
                                jnp.asarray(v, jnp.float32), valid))
    np.testing.assert_allclose(got_masked, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


def test_lbfgs_hvp_is_jittable_and_secant():
    """B s_newest = y_newest (the secant equation of the last BFGS update), under jit."""
    rng = np.random.default_rng(7)
    S = rng.normal(size=(2, 5)).astype(np.float32)
    Y = (S * np.linspace(0.5, 2.0, 5)).astype(np.float32)
    dg_product = functools.partial(lbfgs_product, scale="sy/ss", min_scale=MIN_SIGMA)
    out = jax.jit(dg_product)(S, Y, S[-1], jnp.ones(2, bool))
    np.testing.assert_allclose(np.asarray(out), Y[-1], rtol=1e-4, atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError):
        DeltaGradConfig(lr=0.0, steps=10)
    with pytest.raises(ValueError):
        DeltaGradConfig(lr=0.1, steps=10, T0=0)
