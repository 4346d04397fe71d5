"""Membership-inference evaluation of unlearning: original vs retrained vs unlearned models.

Members are the forget (removed) examples, non-members are held-out examples (balanced in
count with the members, subsampled deterministically from a seed). The target for an
unlearned model is the *retrained* model's value, not 0.5: an AUC far below the retrained
one leaks as much as one far above it.

- `default_mia` -- the cheap default: the loss-threshold attack
  (`attacks.DEFAULT_ATTACK`) on every model.
- `full_suite` -- every threshold attack, the learned attack, and LiRA online /
  offline with shadow models trained in one vmapped call; returns metrics and ROC curves.
- `mia_for_report` -- the block ``mini-unlearn unlearn --mia`` adds to its report.
The ``mini-unlearn attack`` subcommand that runs `full_suite` lives in `mini_unlearn_jax/app/cli/attack.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..core.models import Objective
from . import attacks as A
from . import lira
from .metrics import log_probs

Params = Any

THRESHOLD_NAMES = tuple(A.THRESHOLD_ATTACKS)
SUITE_ATTACKS = THRESHOLD_NAMES + ("learned", "lira_online", "lira_offline")
PLOT_ATTACKS = (A.DEFAULT_ATTACK, "lira_online")


# =============================================================================
# Member / non-member selection and metrics
# =============================================================================


def balanced_indices(n_members: int, n_nonmembers: int, *, seed: int = 0,
                     balance: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the members and non-members to score, equal in number where possible.

    The larger of the two sets is subsampled without replacement (``numpy`` generator seeded
    with ``seed``, indices returned sorted) down to the size of the smaller one; with
    ``balance=False`` both are used whole.
    """
    if n_members < 1 or n_nonmembers < 1:
        raise ValueError(f"need at least one member and one non-member, got {n_members} and {n_nonmembers}")
    mem, non = np.arange(n_members), np.arange(n_nonmembers)
    if not balance or n_members == n_nonmembers:
        return mem, non
    rng = np.random.default_rng(seed)
    k = min(n_members, n_nonmembers)
    if n_nonmembers > k:
        non = np.sort(rng.choice(n_nonmembers, size=k, replace=False))
    else:
        mem = np.sort(rng.choice(n_members, size=k, replace=False))
    return mem, non


def auc_standard_error(auc: float, n_members: int, n_nonmembers: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC estimate."""
    a = float(np.clip(auc, 1e-12, 1.0 - 1e-12))
    q1, q2 = a / (2.0 - a), 2.0 * a * a / (1.0 + a)
    var = (a * (1 - a) + (n_members - 1) * (q1 - a * a) + (n_nonmembers - 1) * (q2 - a * a)) / (n_members * n_nonmembers)
    return float(np.sqrt(max(var, 0.0)))


def _metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict[str, float]:
    m = A.roc_metrics(member_scores, nonmember_scores)
    m["auc_se"] = auc_standard_error(m["auc"], m["n_members"], m["n_nonmembers"])
    return m


def _attack_sets(x_forget, y_forget, x_heldout, y_heldout, seed: int, balance: bool):
    """Checked members (forget) and non-members (held-out), subsampled by `balanced_indices`:
    ``(member_idx, nonmember_idx, (x_mem, y_mem), (x_non, y_non))``."""
    if len(x_forget) != len(y_forget) or len(x_heldout) != len(y_heldout):
        raise ValueError("x and y of the forget / held-out sets must have the same length")
    if len(x_forget) < 1 or len(x_heldout) < 1:
        raise ValueError(f"need a non-empty forget set and held-out set, got {len(x_forget)} and {len(x_heldout)}")
    mem, non = balanced_indices(len(x_forget), len(x_heldout), seed=seed, balance=balance)
    return (mem, non, (np.asarray(x_forget)[mem], np.asarray(y_forget)[mem]),
            (np.asarray(x_heldout)[non], np.asarray(y_heldout)[non]))


# =============================================================================
# Default attack
# =============================================================================


def default_mia(
    objective: Objective,
    params_by_name: Mapping[str, Params],
    x_forget: Any,
    y_forget: Any,
    x_heldout: Any,
    y_heldout: Any,
    *,
    seed: int = 0,
    balance: bool = True,
) -> dict[str, dict[str, Any]]:
    """The default membership-inference attack (loss threshold) on each model.

    Members are the forget examples, non-members held-out ones; the larger set is subsampled
    to the size of the smaller (see `balanced_indices`), the same examples for every
    model.

    Args:
      objective: the models' objective (its ``apply_fn`` gives logits).
      params_by_name: e.g. ``{"original": w_star, "retrain": w_R, "unlearned": w_U}``.
      x_forget, y_forget: the removed examples.
      x_heldout, y_heldout: examples no model trained on (e.g. the test set).
      seed: seeds the subsampling.
      balance: subsample to equal counts (True) or use both sets whole.

    Returns:
      ``{name: {"attack": "loss", "auc", "advantage", "tpr_at_1pct_fpr",
      "tpr_at_0.1pct_fpr", "auc_se", "n_members", "n_nonmembers"}}``.
    """
    _, _, (xf, yf), (xh, yh) = _attack_sets(x_forget, y_forget, x_heldout, y_heldout, seed, balance)
    score = A.THRESHOLD_ATTACKS[A.DEFAULT_ATTACK]
    out = {}
    for name, params in params_by_name.items():
        pf = np.exp(log_probs(objective, params, xf))
        ph = np.exp(log_probs(objective, params, xh))
        out[name] = {"attack": A.DEFAULT_ATTACK, **_metrics(score(pf, yf), score(ph, yh))}
    return out


# =============================================================================
# Shadow models and the full suite
# =============================================================================


class ShadowSet(NamedTuple):
    """What LiRA needs from the shadow models about a set of examples.

    Attributes:
      phi: ``[num_shadows, n]`` logit-scaled confidences (`attacks.logit_confidence`).
      in_mask: bool ``[num_shadows, n]``, True where the example trained the shadow.
    """

    phi: np.ndarray
    in_mask: np.ndarray

    def take(self, idx: Any) -> ShadowSet:
        """The columns ``idx``."""
        idx = np.asarray(idx)
        return ShadowSet(self.phi[:, idx], self.in_mask[:, idx])


class ShadowRecipe(NamedTuple):
    """How the shadow models are trained (mimicking the target's recipe)."""

    steps: int
    lr: float
    batch_size: int | None
    optimizer_name: str

    def optimizer(self) -> optax.GradientTransformation:
        return optax.sgd(self.lr) if self.optimizer_name == "sgd" else optax.adam(self.lr)

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "lr": self.lr, "batch_size": self.batch_size, "optimizer": self.optimizer_name}


def shadow_recipe(train_config: Any, steps: int | None = None) -> ShadowRecipe:
    """The target's recipe for shadows: the same Adam/SGD, learning rate, batch size and steps.

    L-BFGS recipes (full batch, convex models) become full-batch Adam with ``lr=1e-2`` for
    500 steps, since the shadows are trained by first-order steps inside ``lax.scan``.
    ``steps`` overrides the number of steps.
    """
    if train_config.optimizer in ("adam", "sgd"):
        r = ShadowRecipe(int(train_config.steps), float(train_config.learning_rate), train_config.batch_size,
                         train_config.optimizer)
    else:
        r = ShadowRecipe(500, 1e-2, None, "adam")
    return r._replace(steps=int(steps)) if steps is not None else r


def train_shadow_set(
    objective: Objective,
    init_params_fn: Callable[[jax.Array], Params],
    x_pool: Any,
    y_pool: Any,
    *,
    num_shadows: int = 16,
    recipe: ShadowRecipe,
    seed: int = 0,
) -> tuple[ShadowSet, float]:
    """Train ``num_shadows`` shadows on random halves of the pool in one vmapped call.

    Every pool example trains exactly ``num_shadows // 2`` shadows
    (`lira.train_shadow_models` with balanced masks).

    Returns:
      ``(ShadowSet over the pool, training seconds including compilation)``.
    """
    t0 = time.perf_counter()
    sh = lira.train_shadow_models(objective, init_params_fn, x_pool, y_pool, jax.random.key(seed), num_shadows,
                                  recipe.steps, recipe.lr, batch_size=recipe.batch_size, optimizer=recipe.optimizer())
    phi = lira.shadow_logit_confidence(objective, sh.params, x_pool, y_pool)
    return ShadowSet(phi, sh.in_mask), time.perf_counter() - t0


def _target_phi(objective: Objective, params: Params, x: Any, y: Any) -> np.ndarray:
    fn = jax.jit(lambda p, xb, yb: A.logit_confidence(objective.logits(p, xb), yb))
    return np.asarray(fn(params, jnp.asarray(x), jnp.asarray(y)), np.float64)


def full_suite(
    objective: Objective,
    params_by_name: Mapping[str, Params],
    x_forget: Any,
    y_forget: Any,
    x_heldout: Any,
    y_heldout: Any,
    *,
    init_params_fn: Callable[[jax.Array], Params] | None = None,
    recipe: ShadowRecipe | None = None,
    num_shadows: int = 16,
    x_extra: Any = None,
    y_extra: Any = None,
    shadows: tuple[ShadowSet, ShadowSet] | None = None,
    learned: bool = True,
    seed: int = 0,
    balance: bool = True,
    return_scores: bool = False,
) -> tuple[dict[str, Any], dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]] | tuple[dict, dict, dict]:
    """All attacks on every model: threshold attacks, the learned attack, LiRA online/offline.

    Members and non-members are chosen as in `default_mia`. Unless ``shadows`` is
    given, ``num_shadows`` shadow models are trained with ``recipe`` in one vmapped call on
    the pool ``members + non-members (+ x_extra)``: every pool example is IN for exactly half
    the shadows. ``x_extra`` (e.g. the retained training data) makes the shadows' training
    sets as large as the target's, as in LiRA where shadows train on random halves of the
    whole data; the extra examples are never scored.

    Args:
      objective: the models' objective.
      params_by_name: ``{name: params}``, e.g. original / retrain / unlearned.
      x_forget, y_forget: members (removed examples).
      x_heldout, y_heldout: non-members.
      init_params_fn: ``key -> params`` for the shadows (needed unless ``shadows``).
      recipe: the shadows' training recipe (see `shadow_recipe`; needed unless ``shadows``).
      num_shadows: number of shadows (at least 2; LiRA wants 16 or more).
      x_extra, y_extra: further pool examples (optional).
      shadows: precomputed ``(ShadowSet over x_forget, ShadowSet over x_heldout)``, aligned
        with the arrays given here (before subsampling); skips the training.
      learned: also run the learned (logistic-regression) attack.
      seed: seeds the subsampling, the shadows and the learned attack's folds.
      balance: subsample to equal counts.
      return_scores: also return the raw scores (for bootstrap intervals, see `paired_auc_gap`).

    Returns:
      ``(report, curves)``: ``report = {"n_members", "n_nonmembers", "shadows": {...},
      "models": {name: {attack: metrics}}}`` with attacks from `SUITE_ATTACKS` and the
      metrics of `default_mia`; ``curves = {name: {attack: (fpr, tpr)}}`` for every
      attack but the learned one. With ``return_scores`` a third item
      ``{name: {attack: (member_scores, nonmember_scores)}}`` (same attacks as ``curves``).
    """
    mem, non, (xf, yf), (xh, yh) = _attack_sets(x_forget, y_forget, x_heldout, y_heldout, seed, balance)
    nf, nh = len(mem), len(non)
    shadow_info: dict[str, Any]
    if shadows is None:
        if init_params_fn is None or recipe is None:
            raise ValueError("full_suite needs init_params_fn and recipe to train shadows (or precomputed shadows)")
        pool_x, pool_y = [xf, xh], [yf, yh]
        if x_extra is not None:
            pool_x.append(np.asarray(x_extra))
            pool_y.append(np.asarray(y_extra))
        pool_x = np.concatenate(pool_x)
        pool_y = np.concatenate(pool_y)
        sset, train_s = train_shadow_set(objective, init_params_fn, pool_x, pool_y, num_shadows=num_shadows,
                                         recipe=recipe, seed=seed)
        sh_m, sh_h = sset.take(np.arange(nf)), sset.take(np.arange(nf, nf + nh))
        shadow_info = {"num_shadows": num_shadows, "pool_size": int(len(pool_x)), "train_s": train_s,
                       **recipe.as_dict()}
    else:
        sh_m, sh_h = shadows[0].take(mem), shadows[1].take(non)
        shadow_info = {"num_shadows": int(sh_m.phi.shape[0]), "precomputed": True}
    models: dict[str, dict[str, Any]] = {}
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    all_scores: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for name, params in params_by_name.items():
        pf = np.exp(log_probs(objective, params, xf))
        ph = np.exp(log_probs(objective, params, xh))
        res: dict[str, Any] = {}
        cur: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        scores: dict[str, tuple[np.ndarray, np.ndarray]] = {
            k: (fn(pf, yf), fn(ph, yh)) for k, fn in A.THRESHOLD_ATTACKS.items()
        }
        phi_f, phi_h = _target_phi(objective, params, xf, yf), _target_phi(objective, params, xh, yh)
        phi_t = np.concatenate([phi_f, phi_h])
        phi_s = np.concatenate([sh_m.phi, sh_h.phi], axis=1)
        mask = np.concatenate([sh_m.in_mask, sh_h.in_mask], axis=1)
        for kind, online in (("lira_online", True), ("lira_offline", False)):
            s = lira.lira_scores(phi_t, phi_s, mask, online=online)
            scores[kind] = (s[:nf], s[nf:])
        for k, (sm, sn) in scores.items():
            res[k] = _metrics(sm, sn)
            cur[k] = A.roc_curve(sm, sn)
        if learned and min(nf, nh) >= 5:
            lm = A.learned_attack(pf, yf, ph, yh, seed=seed)
            lm["auc_se"] = auc_standard_error(lm["auc"], nf, nh)
            res["learned"] = lm
        models[name] = {k: res[k] for k in SUITE_ATTACKS if k in res}
        curves[name] = cur
        all_scores[name] = scores
    report = {"n_members": nf, "n_nonmembers": nh, "shadows": shadow_info, "models": models}
    if return_scores:
        return report, curves, all_scores
    return report, curves


def _auc_rows(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUC (ties count one half) of each row of ``pos [b, n1]`` against ``neg [b, n0]``."""
    from scipy.stats import rankdata

    n1, n0 = pos.shape[1], neg.shape[1]
    ranks = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    return (ranks[:, :n1].sum(1) - n1 * (n1 + 1) / 2.0) / (n1 * n0)


def paired_auc_gap(scores_a: tuple[Any, Any], scores_b: tuple[Any, Any], *, n_boot: int = 1000,
                   seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """AUC(a) - AUC(b) on the same members / non-members, with a paired bootstrap interval.

    ``scores_a`` and ``scores_b`` are ``(member_scores, nonmember_scores)`` of two models over
    the same examples in the same order (e.g. an unlearned and the retrained model). Members
    and non-members are resampled with replacement, the same draws for both models.

    Returns:
      ``{"gap", "lo", "hi", "se"}``: the observed gap, the percentile interval at ``level``
      and the bootstrap standard deviation.
    """
    am, an = (np.asarray(s, np.float64) for s in scores_a)
    bm, bn = (np.asarray(s, np.float64) for s in scores_b)
    if am.shape != bm.shape or an.shape != bn.shape:
        raise ValueError("the two models must be scored on the same members and non-members")
    gap = float(_auc_rows(am[None], an[None])[0] - _auc_rows(bm[None], bn[None])[0])
    rng = np.random.default_rng(seed)
    im = rng.integers(0, am.size, (n_boot, am.size))
    inn = rng.integers(0, an.size, (n_boot, an.size))
    boot = _auc_rows(am[im], an[inn]) - _auc_rows(bm[im], bn[inn])
    q = (1.0 - level) / 2.0
    return {"gap": gap, "lo": float(np.quantile(boot, q)), "hi": float(np.quantile(boot, 1.0 - q)),
            "se": float(np.std(boot, ddof=1))}


def summarize(report: Mapping[str, Any], attacks: tuple[str, ...] = PLOT_ATTACKS,
              reference: str = "retrain") -> dict[str, dict[str, Any]]:
    """``{attack: {model: auc, ..., "<model>_gap_to_<reference>": auc - auc_ref}}`` from a suite report."""
    out: dict[str, dict[str, Any]] = {}
    models = report["models"]
    for att in attacks:
        row = {name: models[name][att]["auc"] for name in models if att in models[name]}
        if reference in row:
            for name, auc in list(row.items()):
                if name != reference:
                    row[f"{name}_gap_to_{reference}"] = auc - row[reference]
        out[att] = row
    return out


# =============================================================================
# The block `mini-unlearn unlearn --mia` adds to its report
# =============================================================================


def mia_for_report(problem: Any, ds: Any, forget_local: Any, unlearned_params: Params,
                   retrain_params: Params | None, original_params: Params, *, seed: int = 0,
                   nonmembers: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Loss-attack MIA of the original, retrained and unlearned models for an unlearn report.

    Members are ``problem.x[forget_local]``, non-members ``ds.x_test`` (or ``nonmembers``, an
    ``(x, y)`` pair: e.g. the test set without a held-out split a method used) subsampled to the
    same count. ``retrain_params`` may be None (then only original and unlearned are attacked).

    Returns:
      ``{"attack": "loss", "n_members", "n_nonmembers", "original": {...}, "retrain": {...},
      "unlearned": {...}, "auc_gap_to_retrain": auc_U - auc_R}`` (each model's dict holds
      ``auc``, ``advantage``, ``tpr_at_1pct_fpr``, ``tpr_at_0.1pct_fpr``, ``auc_se``).
    """
    idx = np.asarray(forget_local)
    x, y = np.asarray(problem.x), np.asarray(problem.y)
    models = {"original": original_params, "unlearned": unlearned_params}
    if retrain_params is not None:
        models["retrain"] = retrain_params
    x_non, y_non = nonmembers if nonmembers is not None else (ds.x_test, ds.y_test)
    res = default_mia(problem.objective, models, x[idx], y[idx], x_non, y_non, seed=seed)
    keys = ("auc", "advantage", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "auc_se")
    first = next(iter(res.values()))
    out: dict[str, Any] = {"attack": A.DEFAULT_ATTACK, "n_members": first["n_members"],
                           "n_nonmembers": first["n_nonmembers"]}
    for name in ("original", "retrain", "unlearned"):
        if name in res:
            out[name] = {k: res[name][k] for k in keys}
    if "retrain" in res:
        out["auc_gap_to_retrain"] = res["unlearned"]["auc"] - res["retrain"]["auc"]
    return out
