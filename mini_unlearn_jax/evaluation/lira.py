"""LiRA: the likelihood-ratio membership-inference attack with shadow models.

The attack of Carlini et al. (2022). Shadow models are trained on random halves of a pool of
candidate examples (`train_shadow_models`, all of them in one jitted `vmap`), so every example
has IN shadows (trained on it) and OUT shadows (not). For example `i` the shadows'
logit-scaled confidences `phi = log p_y - log sum_{c != y} p_c`
(`attacks.logit_confidence`, via `shadow_logit_confidence`) are fitted with Gaussians
`N(mu_in_i, s_in^2)` and `N(mu_out_i, s_out^2)`, and the target model's `phi_i` is scored by
`lira_scores`:

- online: `log N(phi_i; mu_in_i, s_in) - log N(phi_i; mu_out_i, s_out)`, the log likelihood
  ratio of IN vs OUT;
- offline: `log Phi((phi_i - mu_out_i) / s_out)`, a one-sided test against the OUT shadows only.

Higher scores mean "member"; the members' and non-members' scores go to `attacks.roc_metrics`.
`evaluation/privacy.py` runs the attack in the privacy suite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..core.models import Objective
from .attacks import logit_confidence

Params = Any
Array = jax.Array


class ShadowModels(NamedTuple):
    """Shadow models trained by `train_shadow_models`.

    Attributes:
      params: parameter pytree with a leading axis of size ``num_shadows``.
      in_mask: bool ``[num_shadows, n_pool]``; ``in_mask[k, i]`` iff example ``i`` trained shadow ``k``.
    """

    params: Params
    in_mask: np.ndarray


def inclusion_masks(key: Array, num_shadows: int, n_pool: int, *, balanced: bool = True) -> Array:
    """Random half-split inclusion masks ``[num_shadows, n_pool]``.

    ``balanced=True`` (LiRA's scheme) puts every example in exactly ``num_shadows // 2``
    shadows, so each shadow holds about half the pool; ``balanced=False`` gives every shadow
    an independent uniformly random half (``n_pool // 2`` examples).
    """
    if balanced:
        u = jax.random.uniform(key, (num_shadows, n_pool))
        rank = jnp.argsort(jnp.argsort(u, axis=0), axis=0)
        return rank < num_shadows // 2
    keys = jax.random.split(key, num_shadows)
    rank = jax.vmap(lambda k: jnp.argsort(jax.random.permutation(k, n_pool)))(keys)
    return rank < n_pool // 2


def train_shadow_models(
    objective: Objective,
    init_params_fn: Callable[[Array], Params],
    x_pool: Any,
    y_pool: Any,
    key: Array,
    num_shadows: int,
    steps: int,
    lr: float,
    *,
    batch_size: int | None = None,
    optimizer: optax.GradientTransformation | None = None,
    balanced: bool = True,
    mesh: Any = None,
    mesh_axis: str = "data",
) -> ShadowModels:
    """Train ``num_shadows`` shadow models on random halves of a pool in one jitted ``vmap``.

    Each shadow ``k`` gets its own init key and inclusion mask ``m_k`` (see
    `inclusion_masks`) and minimizes ``objective.data_loss(params, x, y, m_k) +
    objective.penalty(params)`` for ``steps`` optimizer steps inside ``jax.lax.scan``: full
    batch by default, or mini-batches of ``batch_size`` drawn with replacement from the
    shadow's included examples. One compiled program trains all shadows at once.

    Args:
      objective: the model and loss (see `Objective`).
      init_params_fn: ``key -> params``; called once, under ``vmap``.
      x_pool, y_pool: the pool of ``n_pool`` candidate training examples.
      key: PRNG key for the masks, the inits and the mini-batches.
      num_shadows: number of shadow models.
      steps: optimizer steps per shadow.
      lr: learning rate of the default optimizer, ``optax.adam(lr)``.
      batch_size: ``None`` for full batch, else the mini-batch size.
      optimizer: overrides the default optimizer.
      balanced: passed to `inclusion_masks`.
      mesh, mesh_axis: a ``jax.sharding.Mesh``; the shadow axis is sharded over ``mesh_axis``
        (``num_shadows`` must divide evenly), each device training its share of the shadows.

    Returns:
      `ShadowModels` with stacked ``params`` and the bool ``in_mask [num_shadows, n_pool]``.
    """
    if mesh is not None and num_shadows % mesh.shape[mesh_axis]:
        raise ValueError(f"num_shadows={num_shadows} must be a multiple of the mesh axis size {mesh.shape[mesh_axis]}")
    if num_shadows < 2 or steps < 1:
        raise ValueError(f"need num_shadows >= 2 and steps >= 1, got {num_shadows} and {steps}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    x = jnp.asarray(x_pool)
    y = jnp.asarray(y_pool)
    n_pool = x.shape[0]
    opt = optimizer if optimizer is not None else optax.adam(lr)

    def train_one(k: Array, mask: Array) -> Params:
        k_init, k_batch = jax.random.split(k)
        params = init_params_fn(k_init)
        weights = mask.astype(jnp.float32)
        included_first = jnp.argsort(~mask, stable=True)
        n_in = jnp.maximum(jnp.sum(mask), 1)

        def loss_fn(p: Params, t: Array) -> Array:
            if batch_size is None:
                return objective.data_loss(p, x, y, weights) + objective.penalty(p)
            pick = jax.random.randint(jax.random.fold_in(k_batch, t), (batch_size,), 0, n_in)
            idx = included_first[pick]
            return objective.data_loss(p, x[idx], y[idx], weights[idx]) + objective.penalty(p)

        def step(carry, t):
            p, s = carry
            grads = jax.grad(loss_fn)(p, t)
            updates, s = opt.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(steps))
        return params

    @jax.jit
    def train_all(key: Array) -> tuple[Params, Array]:
        k_mask, k_models = jax.random.split(key)
        masks = inclusion_masks(k_mask, num_shadows, n_pool, balanced=balanced)
        keys = jax.random.split(k_models, num_shadows)
        if mesh is not None:
            from jax.sharding import NamedSharding
            from jax.sharding import PartitionSpec as P

            masks = jax.lax.with_sharding_constraint(masks, NamedSharding(mesh, P(mesh_axis)))
            keys = jax.lax.with_sharding_constraint(keys, NamedSharding(mesh, P(mesh_axis)))
        params = jax.vmap(train_one)(keys, masks)
        return params, masks

    params, masks = train_all(key)
    return ShadowModels(params=params, in_mask=np.asarray(masks, dtype=bool))


def shadow_logit_confidence(objective: Objective, shadow_params: Params, x: Any, y: Any) -> np.ndarray:
    """`attacks.logit_confidence` of every shadow on every example: ``[num_shadows, n]``."""
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    fn = jax.jit(jax.vmap(lambda p: logit_confidence(objective.logits(p, x), y)))
    return np.asarray(fn(shadow_params), dtype=np.float64)


def lira_scores(
    target_phi: Any,
    shadow_phi: Any,
    in_mask: Any,
    *,
    online: bool = True,
    global_variance: bool = True,
    min_std: float = 1e-6,
) -> np.ndarray:
    """LiRA membership scores (higher = member) from logit-scaled confidences.

    For example ``i`` the IN (OUT) shadows are those with ``in_mask[k, i]`` true (false); their
    ``phi`` values are fitted with Gaussians ``N(mu_in_i, s_in^2)`` and ``N(mu_out_i, s_out^2)``
    (per-example means; with ``global_variance`` one pooled within-example variance per kind,
    the paper's choice for few shadows, else per-example variances).

    - online: ``log N(phi_i; mu_in_i, s_in) - log N(phi_i; mu_out_i, s_out)``, the log
      likelihood ratio of IN vs OUT.
    - offline: ``log Phi((phi_i - mu_out_i) / s_out)``, the one-sided test of how far above
      the OUT distribution the target's confidence lies (only OUT shadows are used).

    Examples without any IN shadow take the OUT mean plus the average IN-OUT gap (and vice
    versa), so unbalanced masks with few shadows still give a score for every example.

    Args:
      target_phi: ``[n]`` logit-scaled confidences of the target model.
      shadow_phi: ``[num_shadows, n]`` the same for the shadow models.
      in_mask: bool ``[num_shadows, n]``.
      online: likelihood ratio (True) or OUT-only test (False).
      global_variance: pooled (True) or per-example (False) variances.
      min_std: floor on the standard deviations.

    Returns:
      ``[n]`` scores; pass members' and non-members' entries to `attacks.roc_metrics`.
    """
    t = np.asarray(target_phi, dtype=np.float64).reshape(-1)
    s = np.asarray(shadow_phi, dtype=np.float64)
    m = np.asarray(in_mask, dtype=bool)
    if s.ndim != 2 or s.shape != m.shape or s.shape[1] != t.size:
        raise ValueError(f"shapes disagree: target_phi {t.shape}, shadow_phi {s.shape}, in_mask {m.shape}")

    def fit(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cnt = sel.sum(0)
        have = cnt > 0
        mu = np.where(have, (s * sel).sum(0) / np.maximum(cnt, 1), np.nan)
        sq = np.where(sel, (s - np.where(have, mu, 0.0)) ** 2, 0.0).sum(0)
        dof = cnt - 1
        pooled = float(np.sqrt(sq.sum() / dof[dof > 0].sum())) if (dof > 0).any() else 1.0
        if global_variance:
            std = np.full(t.size, pooled)
        else:
            std = np.where(dof > 0, np.sqrt(sq / np.maximum(dof, 1)), pooled)
        return mu, np.maximum(std, min_std), have

    mu_out, sd_out, have_out = fit(~m)
    if not online:
        if not have_out.all():
            raise ValueError("offline LiRA needs at least one OUT shadow for every example")
        from scipy.special import log_ndtr  # float64 tails; scipy loads only when LiRA runs

        return log_ndtr((t - mu_out) / sd_out)
    mu_in, sd_in, have_in = fit(m)
    both = have_in & have_out
    gap = float(np.mean(mu_in[both] - mu_out[both])) if both.any() else 0.0
    mu_in_f = np.where(have_in, mu_in, mu_out + gap)
    mu_out_f = np.where(have_out, mu_out, mu_in - gap)

    def log_normal(v: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
        return -0.5 * ((v - mu) / sd) ** 2 - np.log(sd)

    return log_normal(t, mu_in_f, sd_in) - log_normal(t, mu_out_f, sd_out)
