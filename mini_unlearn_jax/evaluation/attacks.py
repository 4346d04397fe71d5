"""Membership-inference attacks on per-example outputs and the metrics that judge them.

Members are the forget (removed) examples, non-members are held-out examples; every
attack produces a score per example where *higher means "member"*. The pieces:

- `roc_curve` / `roc_metrics` -- exact, sort-based ROC from two score sets (ties handled as
  scikit-learn does): AUC, attacker advantage `max |TPR - FPR|` and TPR at 1% / 0.1% FPR.
- `threshold_attacks` -- loss, confidence, entropy and modified-entropy (Song & Mittal 2021)
  scores from predicted probabilities.
- `learned_attack` -- logistic regression on output features, out-of-fold scores.
- `population_attack` -- the population attack of the Deep Unlearn protocol (Cadet et al. 2024):
  logistic regression on the per-example loss, cross-validated accuracy and indiscernibility.
- `logit_confidence` -- the logit-scaled confidence `phi = log p_y - log sum_{c != y} p_c`, the
  statistic of LiRA (`evaluation/lira.py`, the shadow-model attack) and of the forget score.
- `forget_epsilons` / `forget_score` -- the per-example epsilon estimate and forget score in the
  spirit of the NeurIPS 2023 unlearning challenge: threshold and interval attacks telling the
  unlearned models' outputs from the retrained ones', `eps = max(log((1 - delta - FPR) / FNR),
  log((1 - delta - FNR) / FPR))`.
- `plot_roc` -- log-log ROC curves to a PNG.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

DEFAULT_ATTACK = "loss"
_LOG_FLOOR = 1e-30  # probabilities are clipped here before taking logs


# =============================================================================
# ROC metrics
# =============================================================================


def _as_scores(scores: Any, name: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError(f"{name} is empty: need at least one score")
    if np.isnan(s).any():
        raise ValueError(f"{name} contains NaN scores")
    return s


def _roc_points(member_scores: Any, nonmember_scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FPR, TPR and thresholds for the rules ``score >= t``, one point per distinct score.

    The first point is ``(0, 0)`` at ``t = +inf``; thresholds then run over the distinct
    scores in decreasing order, so tied scores move FPR and TPR together (a diagonal step).
    """
    pos = _as_scores(member_scores, "member_scores")
    neg = _as_scores(nonmember_scores, "nonmember_scores")
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    tp = np.cumsum(labels)
    fp = np.cumsum(1.0 - labels)
    # Keep the last index of every run of equal scores: the rule ``score >= s`` admits the whole run.
    last = np.r_[np.flatnonzero(np.diff(scores) != 0), scores.size - 1]
    tpr = np.r_[0.0, tp[last] / pos.size]
    fpr = np.r_[0.0, fp[last] / neg.size]
    thresholds = np.r_[np.inf, scores[last]]
    return fpr, tpr, thresholds


def roc_curve(member_scores: Any, nonmember_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve of the attack "member iff score >= t" over all thresholds.

    Args:
      member_scores: scores of members (e.g. the forget set), higher = member.
      nonmember_scores: scores of non-members (e.g. held-out examples).

    Returns:
      ``(fpr, tpr)``, non-decreasing, starting at ``(0, 0)`` and ending at ``(1, 1)``; equal to
      ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.
    """
    fpr, tpr, _ = _roc_points(member_scores, nonmember_scores)
    return fpr, tpr


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, level: float) -> float:
    """The largest TPR among ROC points with ``FPR <= level`` (0 if none)."""
    ok = np.asarray(fpr) <= level
    return float(np.max(np.asarray(tpr)[ok])) if ok.any() else 0.0


def roc_metrics(member_scores: Any, nonmember_scores: Any) -> dict[str, float]:
    """Membership-inference metrics from member / non-member scores (higher = member).

    Returns:
      ``auc`` (area under the ROC curve, ties counted one half), ``advantage``
      (``max |TPR - FPR|`` over thresholds), ``tpr_at_1pct_fpr`` and ``tpr_at_0.1pct_fpr``
      (largest TPR with FPR at most 1% / 0.1%), ``n_members`` and ``n_nonmembers``.
    """
    fpr, tpr, _ = _roc_points(member_scores, nonmember_scores)
    return {
        "auc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0)),
        "advantage": float(np.max(np.abs(tpr - fpr))),
        "tpr_at_1pct_fpr": tpr_at_fpr(fpr, tpr, 0.01),
        "tpr_at_0.1pct_fpr": tpr_at_fpr(fpr, tpr, 0.001),
        "n_members": int(np.size(member_scores)),
        "n_nonmembers": int(np.size(nonmember_scores)),
    }


# =============================================================================
# Threshold attacks on output probabilities
# =============================================================================


def _probs_labels(probs: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be [n, C] with one label each; got {p.shape} and {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in [0, {p.shape[1]}); got range [{y.min()}, {y.max()}]")
    return p, y


def _true_class_prob(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    return p[np.arange(y.size), y]


def loss_score(probs: Any, y: Any) -> np.ndarray:
    """Negative cross-entropy ``log p_y`` (members have lower loss)."""
    p, y = _probs_labels(probs, y)
    return np.log(np.clip(_true_class_prob(p, y), _LOG_FLOOR, 1.0))


def confidence_score(probs: Any, y: Any) -> np.ndarray:
    """The probability of the true class ``p_y``."""
    p, y = _probs_labels(probs, y)
    return _true_class_prob(p, y)


def entropy_score(probs: Any, y: Any) -> np.ndarray:
    """Negative prediction entropy ``sum_c p_c log p_c`` (label-free; members are more certain)."""
    p, _ = _probs_labels(probs, y)
    return np.sum(p * np.log(np.clip(p, _LOG_FLOOR, 1.0)), axis=1)


def modified_entropy_score(probs: Any, y: Any) -> np.ndarray:
    """Negative modified entropy of Song & Mittal (2021).

    ``Mentr(p, y) = -(1 - p_y) log p_y - sum_{c != y} p_c log(1 - p_c)``; it is small for
    confident correct predictions and large for confident wrong ones. Returns ``-Mentr``.
    """
    p, y = _probs_labels(probs, y)
    py = _true_class_prob(p, y)
    log_p = np.log(np.clip(p, _LOG_FLOOR, 1.0))
    log_1mp = np.log(np.clip(1.0 - p, _LOG_FLOOR, 1.0))
    wrong = p * log_1mp
    wrong[np.arange(y.size), y] = 0.0
    mentr = -(1.0 - py) * log_p[np.arange(y.size), y] - np.sum(wrong, axis=1)
    return -mentr


THRESHOLD_ATTACKS: dict[str, Callable[[Any, Any], np.ndarray]] = {
    "loss": loss_score,
    "confidence": confidence_score,
    "entropy": entropy_score,
    "modified_entropy": modified_entropy_score,
}


def threshold_attacks(
    probs_members: Any, y_members: Any, probs_nonmembers: Any, y_nonmembers: Any
) -> dict[str, dict[str, float]]:
    """Run every score in `THRESHOLD_ATTACKS`; returns ``{attack_name: roc_metrics}``.

    The name to report by default is `DEFAULT_ATTACK` (``"loss"``).
    """
    return {
        name: roc_metrics(fn(probs_members, y_members), fn(probs_nonmembers, y_nonmembers))
        for name, fn in THRESHOLD_ATTACKS.items()
    }


# =============================================================================
# Learned attack
# =============================================================================


def attack_features(probs: Any, y: Any) -> np.ndarray:
    """Features for the learned attack: sorted probabilities (descending) and the four scores."""
    p, y = _probs_labels(probs, y)
    sorted_p = -np.sort(-p, axis=1)
    py = np.clip(_true_class_prob(p, y), _LOG_FLOOR, 1.0)
    logit_conf = np.log(py) - np.log(np.clip(1.0 - py, _LOG_FLOOR, 1.0))
    cols = [fn(p, y) for fn in THRESHOLD_ATTACKS.values()] + [logit_conf]
    return np.column_stack([sorted_p, *cols])


def learned_attack(
    probs_members: Any,
    y_members: Any,
    probs_nonmembers: Any,
    y_nonmembers: Any,
    *,
    n_splits: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """Logistic-regression attack on `attack_features`, scored out of fold.

    A standardized ``sklearn`` logistic regression is fitted on ``n_splits - 1`` folds of a
    ``StratifiedKFold`` split of members and non-members and scores the held-out fold; the
    out-of-fold decision values of all examples then go through `roc_metrics`.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    f_in = attack_features(probs_members, y_members)
    f_out = attack_features(probs_nonmembers, y_nonmembers)
    feats = np.concatenate([f_in, f_out])
    labels = np.r_[np.ones(len(f_in), int), np.zeros(len(f_out), int)]
    if min(len(f_in), len(f_out)) < n_splits:
        raise ValueError(f"need at least n_splits={n_splits} members and non-members, got {len(f_in)} and {len(f_out)}")
    scores = np.empty(labels.size)
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for tr, te in folds.split(feats, labels):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced"))
        clf.fit(feats[tr], labels[tr])
        scores[te] = clf.decision_function(feats[te])
    return roc_metrics(scores[labels == 1], scores[labels == 0])


def population_attack(member_losses: Any, nonmember_losses: Any, *, n_splits: int = 10, seed: int = 0
                      ) -> dict[str, float]:
    """The population membership attack: logistic regression on the per-example loss.

    The larger of the two sets is subsampled (seeded) to the size of the smaller; a
    standardized logistic regression on the loss alone is fitted on 90 % of the examples and
    scored on the other 10 % for each of ``n_splits`` stratified shuffle splits. Returns:

    - ``accuracy``: the mean held-out accuracy (0.5: members and non-members indiscernible);
    - ``indiscernibility`` = ``1 - |accuracy - 0.5| / 0.5``, in ``[0, 1]`` (1 is best);
    - ``auc``: the ROC-AUC of the loss itself as the attack score (``-loss``, members = low
      loss) on the balanced sets, in the project's convention (`roc_metrics`): 0.5 when the
      losses are exchangeable, above when the members fit better, below when they fit worse
      (as for a class the retrained model never saw);
    - ``n_members``, ``n_nonmembers``: the balanced counts.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedShuffleSplit
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    mem, non = _as_scores(member_losses, "member_losses"), _as_scores(nonmember_losses, "nonmember_losses")
    k = min(mem.size, non.size)
    if k < n_splits:
        raise ValueError(f"the population attack needs at least n_splits={n_splits} members and non-members, "
                         f"got {mem.size} and {non.size}")
    rng = np.random.default_rng(seed)
    mem, non = rng.permutation(mem)[:k], rng.permutation(non)[:k]
    feats = np.r_[mem, non][:, None]
    labels = np.r_[np.ones(k, int), np.zeros(k, int)]
    accs = []
    for tr, te in StratifiedShuffleSplit(n_splits=n_splits, test_size=0.1, random_state=seed).split(feats, labels):
        clf = make_pipeline(StandardScaler(), LogisticRegression())
        accs.append(clf.fit(feats[tr], labels[tr]).score(feats[te], labels[te]))
    acc = float(np.mean(accs))
    return {"accuracy": acc, "indiscernibility": 1.0 - abs(acc - 0.5) / 0.5,
            "auc": roc_metrics(-mem, -non)["auc"], "n_members": int(k), "n_nonmembers": int(k)}


# =============================================================================
# Logit-scaled confidence
# =============================================================================


def logit_confidence(logits: Any, y: Any) -> Array:
    """LiRA's logit-scaled confidence ``phi = log p_y - log sum_{c != y} p_c``, computed stably.

    Equal to ``z_y - logsumexp_{c != y} z_c`` for logits ``z`` ([n, C] with labels [n]), so it
    stays finite and exact even where ``p_y`` rounds to 1.
    """
    z = jnp.asarray(logits)
    y = jnp.asarray(y).astype(jnp.int32)
    onehot = jax.nn.one_hot(y, z.shape[-1], dtype=bool)
    z_y = jnp.sum(jnp.where(onehot, z, 0.0), axis=-1)
    rest = jax.nn.logsumexp(jnp.where(onehot, -jnp.inf, z), axis=-1)
    return z_y - rest


# =============================================================================
# Forget score (NeurIPS 2023 unlearning challenge)
# =============================================================================


def _clopper_pearson_upper(n: int, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bounds on a rate after ``k`` of ``n`` events, ``k = 0..n``."""
    from scipy.stats import beta

    k = np.arange(n + 1)
    ub = np.ones(n + 1)
    ub[:n] = beta.ppf(confidence, k[:n] + 1, n - k[:n])
    return ub


def _threshold_eps(
    fn: np.ndarray,
    fp: np.ndarray,
    n_pos: int,
    n_neg: int,
    delta: float,
    bounds: tuple[np.ndarray, np.ndarray] | None,
) -> np.ndarray:
    """Epsilon of each attack from its false-negative / false-positive counts; NaN = discarded.

    With ``bounds`` (Clopper-Pearson tables for the positive and negative sample sizes) the
    rates are replaced by their upper confidence bounds; otherwise the point estimates are
    used with the challenge's rules (FPR = FNR = 0 -> inf; exactly one of them 0 -> discard).
    """
    if bounds is not None:
        fnr, fpr = bounds[0][fn], bounds[1][fp]
    else:
        fnr, fpr = fn / n_pos, fp / n_neg
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = np.log(1.0 - delta - fpr) - np.log(fnr)
        e2 = np.log(1.0 - delta - fnr) - np.log(fpr)
    eps = np.fmax(e1, e2)  # NaN only where both are NaN
    eps = np.where(np.isnan(eps), np.nan, np.maximum(eps, 0.0))
    if bounds is None:
        eps = np.where((fpr == 0) ^ (fnr == 0), np.nan, eps)
        eps = np.where((fpr == 0) & (fnr == 0), np.inf, eps)
    return eps


def _counts(sample: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``#(sample <= g)`` and ``#(sample < g)`` for every grid point; [c, m] x [c, M] -> [c, M]."""
    le = (sample[:, None, :] <= grid[:, :, None]).sum(-1)
    lt = (sample[:, None, :] < grid[:, :, None]).sum(-1)
    return le, lt


def forget_epsilons(
    unlearned: Any,
    retrained: Any,
    *,
    delta: float = 1e-5,
    confidence: float | None = 0.95,
    epsilon_cap: float = 50.0,
    peaky_ratio: float = 0.01,
    chunk: int = 256,
) -> np.ndarray:
    """Per-example epsilon estimates distinguishing unlearned from retrained outputs.

    For forget example ``i`` the samples are ``unlearned[:, i]`` (one per unlearned model) and
    ``retrained[:, i]`` (one per retrained model), e.g. `logit_confidence` values. As in
    the challenge, two families of attacks are scanned, here exactly, with thresholds at every
    observed value:

    - single threshold: predict "positive" iff ``v >= t``, the positive distribution being the
      one with the larger median;
    - interval: predict "positive" iff ``a <= v <= b``, the positive one being the peakier
      distribution (smaller range).

    Each attack's FPR / FNR give ``eps = max(log(1 - delta - FPR) - log FNR,
    log(1 - delta - FNR) - log FPR)``, clipped at 0; the example's epsilon is the maximum over
    attacks (0 if none survives), capped at ``epsilon_cap``.

    - ``confidence=None`` uses the empirical rates with the challenge's rules: FPR = FNR = 0
      gives ``inf`` (then the cap), exactly one of them 0 discards the attack. With few models
      per side this is badly biased upwards: the best of many thresholds fits sampling noise,
      so two *identical* distributions already get epsilons around 1-2.
    - ``confidence=c`` (default 0.95) replaces FPR and FNR by their one-sided Clopper-Pearson
      upper bounds at level ``c`` (as in privacy auditing), so each attack's epsilon is a
      lower confidence bound; identical distributions then get epsilons near 0.

    As in the challenge, when the ratio of the smaller to the larger sample range is below
    ``peaky_ratio`` (one distribution nearly a point mass while the other is not), the epsilon
    is set to ``epsilon_cap``; two point masses give 0 if equal and the cap otherwise.

    Args:
      unlearned: ``[num_unlearned_models, n]``.
      retrained: ``[num_retrained_models, n]``.
      delta: the delta of (epsilon, delta)-indistinguishability.
      confidence: level of the Clopper-Pearson bounds, or None for point estimates.
      epsilon_cap: upper bound on the returned epsilons.
      peaky_ratio: range ratio below which the epsilon is set to the cap.
      chunk: examples per vectorized block (memory ~ chunk * M^2 for M models in all).

    Returns:
      ``[n]`` epsilons in ``[0, epsilon_cap]``.
    """
    u = np.asarray(unlearned, dtype=np.float64)
    r = np.asarray(retrained, dtype=np.float64)
    if u.ndim != 2 or r.ndim != 2 or u.shape[1] != r.shape[1]:
        raise ValueError(f"need [models, n] arrays over the same examples, got {u.shape} and {r.shape}")
    if min(u.shape[0], r.shape[0]) < 2:
        raise ValueError(f"need at least 2 models per side, got {u.shape[0]} and {r.shape[0]}")
    if not (np.isfinite(u).all() and np.isfinite(r).all()):
        raise ValueError("unlearned and retrained outputs must be finite")
    if confidence is not None and not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1) or be None, got {confidence}")
    mu, mr = u.shape[0], r.shape[0]
    if confidence is None:
        b_u = b_r = None
    else:
        b_u, b_r = _clopper_pearson_upper(mu, confidence), _clopper_pearson_upper(mr, confidence)

    def eps_for(tp_u, tp_r, u_positive):
        # tp_u / tp_r: how many unlearned / retrained samples the attack calls positive.
        eps_u = _threshold_eps(mu - tp_u, tp_r, mu, mr, delta, None if b_u is None else (b_u, b_r))
        eps_r = _threshold_eps(mr - tp_r, tp_u, mr, mu, delta, None if b_u is None else (b_r, b_u))
        shape = (-1,) + (1,) * (tp_u.ndim - 1)
        return np.where(u_positive.reshape(shape), eps_u, eps_r)

    n = u.shape[1]
    chunk = max(1, min(chunk, 4_000_000 // (mu + mr) ** 2))
    out = np.empty(n)
    for start in range(0, n, chunk):
        uu, rr = u[:, start:start + chunk].T, r[:, start:start + chunk].T  # [c, m]
        grid = np.sort(np.concatenate([uu, rr], axis=1), axis=1)  # [c, M]
        le_u, lt_u = _counts(uu, grid)
        le_r, lt_r = _counts(rr, grid)
        # Single threshold v >= grid[k]; positive = larger median.
        eps_single = eps_for(mu - lt_u, mr - lt_r, np.median(uu, 1) >= np.median(rr, 1))
        # Interval [grid[a], grid[b]] (a <= b); positive = peakier (smaller range).
        range_u, range_r = np.ptp(uu, 1), np.ptp(rr, 1)
        in_u = np.maximum(le_u[:, None, :] - lt_u[:, :, None], 0)  # [c, a, b]; a > b masked below
        in_r = np.maximum(le_r[:, None, :] - lt_r[:, :, None], 0)
        eps_int = eps_for(in_u, in_r, range_u <= range_r)
        upper = np.triu(np.ones((grid.shape[1], grid.shape[1]), bool))
        eps_int = np.where(upper[None], eps_int, np.nan).reshape(len(grid), -1)
        all_eps = np.concatenate([eps_single, eps_int], axis=1)
        best = np.max(np.where(np.isnan(all_eps), 0.0, all_eps), axis=1)
        small, large = np.minimum(range_u, range_r), np.maximum(range_u, range_r)
        point_masses = large == 0
        differ = point_masses & (uu[:, 0] != rr[:, 0])
        peaky = (large > 0) & (small < peaky_ratio * large)
        best = np.where(peaky | differ, epsilon_cap, np.where(point_masses, 0.0, best))
        out[start:start + chunk] = np.minimum(best, epsilon_cap)
    return out


def forget_score_from_epsilons(epsilons: Any, num_models: int, *, bucket_size: float = 0.5) -> float:
    """The challenge's score from per-example epsilons.

    Buckets ``[j * b, (j + 1) * b)`` with ``b = bucket_size`` are worth ``2^-j`` points for
    every ``j`` whose bucket ends at or below ``max_eps = ceil(log(num_models - 1))``, the
    largest epsilon that ``num_models`` samples per distribution can resolve; an epsilon
    beyond the last bucket earns 0. The score is the mean of the points over examples, so
    it lies in ``[0, 1]``, with 1 when every epsilon is below ``bucket_size``.
    """
    eps = np.asarray(epsilons, dtype=np.float64).reshape(-1)
    if num_models < 3:
        raise ValueError(f"need at least 3 models per distribution, got {num_models}")
    max_eps = float(np.ceil(np.log(num_models - 1)))
    n_buckets = int(np.floor(max_eps / bucket_size + 1e-9))
    bucket = np.floor(eps / bucket_size)
    points = np.where(bucket < n_buckets, 0.5 ** np.minimum(bucket, n_buckets), 0.0)
    return float(np.mean(points))


def forget_score(
    unlearned: Any,
    retrained: Any,
    *,
    delta: float = 1e-5,
    confidence: float | None = 0.95,
    bucket_size: float = 0.5,
    epsilon_cap: float = 50.0,
) -> float:
    """Forget score in the spirit of the NeurIPS 2023 unlearning challenge (higher is better).

    ``unlearned`` [m_u, n] and ``retrained`` [m_r, n] hold one output per model (different
    seeds) and forget example, typically the `logit_confidence`. For each example
    `forget_epsilons` estimates

        eps_i = max over attacks of max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR)),

    the attacks being single thresholds and intervals on the example's outputs (FPR / FNR as
    Clopper-Pearson upper bounds at ``confidence``, or the challenge's point estimates with
    ``confidence=None``), and the score is

        score = (1/n) * sum_i 2^(-floor(eps_i / b)) * [eps_i < b * K],
        K = floor(ceil(log(m - 1)) / b),  m = min(m_u, m_r),  b = bucket_size,

    i.e. 1 point for an example the best attack cannot tell apart (``eps < 0.5``), halved for
    every further bucket, 0 beyond what ``m`` samples can resolve; it lies in ``[0, 1]``. A
    perfect unlearner scores near 1 (with ``confidence=None`` well below 1 even for identical
    distributions, because the point estimates overfit), one whose outputs are clearly
    separable from retraining near 0. A deterministic training recipe (e.g. a convex model
    trained to convergence) gives near point-mass distributions across seeds, which the metric
    treats as maximally peaky: use randomness (init, batch order) that matters.
    """
    u = np.asarray(unlearned)
    r = np.asarray(retrained)
    eps = forget_epsilons(u, r, delta=delta, confidence=confidence, epsilon_cap=epsilon_cap)
    return forget_score_from_epsilons(eps, min(u.shape[0], r.shape[0]), bucket_size=bucket_size)


# =============================================================================
# Plot
# =============================================================================


def plot_roc(curves: dict[str, tuple[Any, Any]], path: str | Path, *, title: str | None = None) -> Path:
    """Write log-log ROC curves (with the chance diagonal) to a PNG.

    Args:
      curves: ``{name: (fpr, tpr)}``, e.g. from `roc_curve`; the legend shows each AUC.
      path: output file; parent folders are created.
      title: optional plot title.

    Returns:
      The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lo = 1e-4
    fig = Figure(figsize=(5, 5))
    FigureCanvasAgg(fig)  # Agg backend, without touching pyplot's global state
    ax = fig.add_subplot()
    for name, (fpr, tpr) in curves.items():
        fpr = np.asarray(fpr, dtype=np.float64)
        tpr = np.asarray(tpr, dtype=np.float64)
        auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
        pos = fpr[fpr > 0]
        if pos.size:
            lo = min(lo, float(pos.min()))
        ax.plot(np.maximum(fpr, 1e-12), np.maximum(tpr, 1e-12), label=f"{name} (AUC {auc:.3f})")
    lo = 10.0 ** np.floor(np.log10(lo))
    ax.plot([lo, 1.0], [lo, 1.0], "k--", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1.0)
    ax.set_ylim(lo, 1.0)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    if title:
        ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
