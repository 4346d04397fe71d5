"""Tests for mini_unlearn_jax.evaluation.attacks and .lira: ROC metrics, threshold / learned attacks, LiRA, forget score."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from mini_unlearn_jax.app.data import synthetic
from mini_unlearn_jax.core.models import LogisticRegression, make_objective
from mini_unlearn_jax.evaluation import attacks as A
from mini_unlearn_jax.evaluation import lira

# -- ROC metrics -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_auc_and_roc_curve_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_in, n_out = rng.integers(1, 80, size=2)
    if seed % 2:  # heavy ties, within and across the two sets
        mem = rng.integers(0, 6, n_in).astype(float)
        non = rng.integers(-1, 5, n_out).astype(float)
    else:
        mem = rng.normal(0.5, 1.0, n_in)
        non = rng.normal(0.0, 1.0, n_out)
        non[: n_out // 3] = mem[0]  # a tie across the sets
    labels = np.r_[np.ones(n_in), np.zeros(n_out)]
    scores = np.r_[mem, non]
    metrics = A.roc_metrics(mem, non)
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    fpr_sk, tpr_sk, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    fpr, tpr = A.roc_curve(mem, non)
    np.testing.assert_allclose(fpr, fpr_sk, atol=1e-12)
    np.testing.assert_allclose(tpr, tpr_sk, atol=1e-12)
    assert metrics["advantage"] == pytest.approx(np.max(np.abs(tpr_sk - fpr_sk)), abs=1e-12)
    assert metrics["n_members"] == n_in and metrics["n_nonmembers"] == n_out


def _brute_force_rates(mem: np.ndarray, non: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    thresholds = np.r_[np.inf, np.unique(np.r_[mem, non])]
    tpr = np.array([(mem >= t).mean() for t in thresholds])
    fpr = np.array([(non >= t).mean() for t in thresholds])
    return fpr, tpr


@pytest.mark.parametrize("seed", range(3))
def test_tpr_at_low_fpr_is_the_best_tpr_within_the_fpr_budget(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    mem = np.round(rng.normal(1.0, 1.0, 700), 1)  # rounding creates ties
    non = np.round(rng.normal(0.0, 1.0, 3000), 1)
    metrics = A.roc_metrics(mem, non)
    fpr, tpr = _brute_force_rates(mem, non)
    for key, level in (("tpr_at_1pct_fpr", 0.01), ("tpr_at_0.1pct_fpr", 0.001)):
        assert metrics[key] == pytest.approx(tpr[fpr <= level].max(), abs=1e-12)
    assert metrics["advantage"] == pytest.approx(np.abs(tpr - fpr).max(), abs=1e-12)


def test_tpr_at_fpr_hand_example() -> None:
    # 1000 non-members: one of them scores 5, the rest 0. Members: 2 at 10, 1 at 5, 7 at -1.
    non = np.r_[5.0, np.zeros(999)]
    mem = np.r_[10.0, 10.0, 5.0, -np.ones(7)]
    m = A.roc_metrics(mem, non)
    assert m["tpr_at_0.1pct_fpr"] == pytest.approx(0.3)  # t = 5: FPR = 1/1000 allowed
    assert m["tpr_at_1pct_fpr"] == pytest.approx(0.3)  # the next threshold (0) has FPR = 1
    assert A.tpr_at_fpr(*A.roc_curve(mem, non), 0.0) == pytest.approx(0.2)
    perfect = A.roc_metrics([2.0, 3.0], [0.0, 1.0])
    assert perfect["auc"] == 1.0 and perfect["advantage"] == 1.0 and perfect["tpr_at_0.1pct_fpr"] == 1.0


def test_roc_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        A.roc_metrics([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        A.roc_metrics([np.nan], [1.0])


# -- threshold and learned attacks -----------------------------------------------------------


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _outputs(rng: np.random.Generator, n: int, margin: float, classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities whose true-class logit exceeds the rest by ``margin`` on average."""
    y = rng.integers(0, classes, n)
    z = rng.normal(0.0, 1.0, (n, classes))
    z[np.arange(n), y] += margin + rng.normal(0.0, 1.0, n)
    return _softmax(z), y


def test_score_functions_match_their_formulas() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    y = np.array([0, 1])
    np.testing.assert_allclose(A.loss_score(p, y), np.log([0.7, 0.3]))
    np.testing.assert_allclose(A.confidence_score(p, y), [0.7, 0.3])
    np.testing.assert_allclose(A.entropy_score(p, y), np.sum(p * np.log(p), 1))
    mentr0 = -(0.3 * np.log(0.7)) - (0.2 * np.log(0.8) + 0.1 * np.log(0.9))
    mentr1 = -(0.7 * np.log(0.3)) - (0.1 * np.log(0.9) + 0.6 * np.log(0.4))
    np.testing.assert_allclose(A.modified_entropy_score(p, y), [-mentr0, -mentr1])
    # Modified entropy punishes a confident wrong prediction more than a confident right one.
    right, wrong = A.modified_entropy_score(np.array([[0.98, 0.01, 0.01]] * 2), np.array([0, 1]))
    assert right > wrong
    with pytest.raises(ValueError, match="labels"):
        A.loss_score(p, np.array([0, 3]))


def test_threshold_attacks_detect_a_leaky_model() -> None:
    rng = np.random.default_rng(0)
    p_in, y_in = _outputs(rng, 1500, margin=4.0)  # members: lower loss
    p_out, y_out = _outputs(rng, 1500, margin=1.0)
    res = A.threshold_attacks(p_in, y_in, p_out, y_out)
    assert set(res) == {"loss", "confidence", "entropy", "modified_entropy"}
    assert A.DEFAULT_ATTACK in res
    for name in ("loss", "confidence", "modified_entropy"):
        assert res[name]["auc"] > 0.8, (name, res[name])
        assert res[name]["advantage"] > 0.4
    assert res["entropy"]["auc"] > 0.7
    assert res["loss"]["auc"] == pytest.approx(res["confidence"]["auc"])  # monotone transforms


def test_threshold_attacks_are_at_chance_on_identical_distributions() -> None:
    rng = np.random.default_rng(1)
    p_in, y_in = _outputs(rng, 2000, margin=2.0)
    p_out, y_out = _outputs(rng, 2000, margin=2.0)
    for name, m in A.threshold_attacks(p_in, y_in, p_out, y_out).items():
        assert abs(m["auc"] - 0.5) < 0.04, (name, m)


def test_learned_attack_out_of_fold() -> None:
    rng = np.random.default_rng(2)
    p_in, y_in = _outputs(rng, 600, margin=4.0)
    p_out, y_out = _outputs(rng, 600, margin=1.0)
    assert A.attack_features(p_in, y_in).shape == (600, 5 + 5)
    leaky = A.learned_attack(p_in, y_in, p_out, y_out, n_splits=5)
    assert leaky["auc"] > 0.8 and leaky["n_members"] == 600
    q_in, z_in = _outputs(rng, 600, margin=2.0)
    q_out, z_out = _outputs(rng, 600, margin=2.0)
    same = A.learned_attack(q_in, z_in, q_out, z_out, n_splits=5)
    assert abs(same["auc"] - 0.5) < 0.07


# -- LiRA ------------------------------------------------------------------------------------


def test_logit_confidence_is_stable_and_exact() -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(0.0, 2.0, (50, 4))
    y = rng.integers(0, 4, 50)
    p = _softmax(z)
    py = p[np.arange(50), y]
    np.testing.assert_allclose(np.asarray(A.logit_confidence(z, y)), np.log(py) - np.log(1 - py), rtol=1e-5, atol=1e-5)
    extreme = jnp.array([[200.0, 0.0, 0.0], [0.0, 300.0, 0.0]], jnp.float32)
    phi = np.asarray(A.logit_confidence(extreme, jnp.array([0, 0])))
    assert np.all(np.isfinite(phi))
    np.testing.assert_allclose(phi, [200.0 - np.log(2.0), -300.0], rtol=1e-6)


def test_inclusion_masks_are_half_splits() -> None:
    key = jax.random.key(0)
    bal = np.asarray(lira.inclusion_masks(key, 8, 101, balanced=True))
    assert bal.shape == (8, 101) and bal.dtype == bool
    assert np.all(bal.sum(0) == 4)  # every example IN for exactly half the shadows
    ind = np.asarray(lira.inclusion_masks(key, 6, 101, balanced=False))
    assert np.all(ind.sum(1) == 50)  # every shadow holds exactly half the pool
    assert len({row.tobytes() for row in ind}) == 6


NUM_SHADOWS = 8


@pytest.fixture(scope="module")
def shadows():
    ds = synthetic(n=200, n_test=10, d=20, classes=3, sep=0.3, seed=0)
    model = LogisticRegression(num_classes=3)
    objective = make_objective(model, l2=1e-4)
    traces: list[int] = []

    def init_fn(key):
        traces.append(1)  # Python side effect: runs once per trace, not once per shadow
        return model.init(key, jnp.zeros((1, 20)))["params"]

    sh = lira.train_shadow_models(
        objective, init_fn, ds.x_train, ds.y_train, jax.random.key(0), NUM_SHADOWS, steps=500, lr=0.1
    )
    phi = lira.shadow_logit_confidence(objective, sh.params, ds.x_train, ds.y_train)
    return ds, objective, sh, phi, len(traces)


def test_shadow_models_are_trained_in_one_vmapped_call(shadows) -> None:
    ds, objective, sh, phi, n_traces = shadows
    assert n_traces == 1
    assert sh.in_mask.shape == (NUM_SHADOWS, 200) and sh.in_mask.dtype == bool
    assert abs(sh.in_mask.mean() - 0.5) < 0.05
    assert np.all(sh.in_mask.sum(0) == NUM_SHADOWS // 2)
    for leaf in jax.tree.leaves(sh.params):
        assert leaf.shape[0] == NUM_SHADOWS
    assert phi.shape == (NUM_SHADOWS, 200)
    assert np.all(np.isfinite(phi))
    # Each shadow fits its own half (different masks -> different models) and overfits it.
    kernels = np.asarray(sh.params["Dense_0"]["kernel"])
    assert np.min(np.linalg.norm(kernels[1:] - kernels[0], axis=(1, 2))) > 1e-3
    acc_in, acc_out = [], []
    for k in range(NUM_SHADOWS):
        params = jax.tree.map(lambda a, k=k: a[k], sh.params)
        hit = np.asarray(objective.apply_fn(params, ds.x_train)).argmax(1) == ds.y_train
        acc_in.append(hit[sh.in_mask[k]].mean())
        acc_out.append(hit[~sh.in_mask[k]].mean())
    assert np.mean(acc_in) > np.mean(acc_out) + 0.15


@pytest.mark.parametrize("online", [True, False])
def test_lira_separates_members_of_an_overfit_model(shadows, online: bool) -> None:
    _, _, sh, phi, _ = shadows
    members, nonmembers = [], []
    for target in range(NUM_SHADOWS):  # leave-one-out: each shadow in turn is the target
        ref = np.arange(NUM_SHADOWS) != target
        s = lira.lira_scores(phi[target], phi[ref], sh.in_mask[ref], online=online)
        assert s.shape == (200,) and np.all(np.isfinite(s))
        members.append(s[sh.in_mask[target]])
        nonmembers.append(s[~sh.in_mask[target]])
    m = A.roc_metrics(np.concatenate(members), np.concatenate(nonmembers))
    assert m["auc"] > 0.57, m


def test_lira_scores_on_known_gaussians() -> None:
    rng = np.random.default_rng(4)
    n, s = 400, 16
    base = rng.normal(0.0, 5.0, n)  # example difficulty: hides membership from raw phi
    in_mask = rng.random((s, n)) < 0.5
    shadow_phi = base + 2.0 * in_mask + rng.normal(0.0, 1.0, (s, n))
    target_in = rng.random(n) < 0.5
    target_phi = base + 2.0 * target_in + rng.normal(0.0, 1.0, n)
    raw = A.roc_metrics(target_phi[target_in], target_phi[~target_in])["auc"]
    for kw in ({"online": True}, {"online": True, "global_variance": False}, {"online": False}):
        scores = lira.lira_scores(target_phi, shadow_phi, in_mask, **kw)
        auc = A.roc_metrics(scores[target_in], scores[~target_in])["auc"]
        assert auc > 0.8 and auc > raw + 0.15, (kw, auc, raw)
    # Examples without IN (or OUT) shadows still get a finite online score ...
    in_mask[:, 0] = False
    in_mask[:, 1] = True
    assert np.all(np.isfinite(lira.lira_scores(target_phi, shadow_phi, in_mask)))
    # ... but the offline test needs OUT shadows everywhere.
    with pytest.raises(ValueError, match="OUT shadow"):
        lira.lira_scores(target_phi, shadow_phi, in_mask, online=False)
    with pytest.raises(ValueError, match="shapes"):
        lira.lira_scores(target_phi[:-1], shadow_phi, in_mask)


def test_minibatch_shadow_training_runs() -> None:
    ds = synthetic(n=60, n_test=5, d=4, classes=2, seed=1)
    model = LogisticRegression(num_classes=2)
    objective = make_objective(model, l2=1e-3)
    sh = lira.train_shadow_models(
        objective,
        lambda k: model.init(k, jnp.zeros((1, 4)))["params"],
        ds.x_train,
        ds.y_train,
        jax.random.key(1),
        num_shadows=4,
        steps=50,
        lr=0.05,
        batch_size=16,
        balanced=False,
    )
    assert sh.in_mask.shape == (4, 60) and np.all(sh.in_mask.sum(1) == 30)
    phi = lira.shadow_logit_confidence(objective, sh.params, ds.x_train, ds.y_train)
    assert phi.shape == (4, 60) and np.all(np.isfinite(phi)) and np.abs(phi).max() > 0
    with pytest.raises(ValueError):
        lira.train_shadow_models(objective, lambda k: None, ds.x_train, ds.y_train, jax.random.key(0), 1, 10, 0.1)


# -- forget score ----------------------------------------------------------------------------


def test_forget_score_from_epsilons_buckets() -> None:
    # 64 models: max_eps = ceil(log 63) = 5, so 10 buckets of width 0.5 worth 1, 1/2, ..., 1/512.
    eps = np.array([0.1, 0.6, 1.2, 4.9, 5.0, 50.0])
    expected = (1 + 0.5 + 0.25 + 0.5**9 + 0 + 0) / 6
    assert A.forget_score_from_epsilons(eps, 64) == pytest.approx(expected)
    assert A.forget_score_from_epsilons(np.zeros(5), 64) == 1.0


def test_forget_score_identical_vs_separated() -> None:
    rng = np.random.default_rng(5)
    m, n = 32, 100
    scale = rng.uniform(0.5, 3.0, n)  # per-example spread of the outputs across seeds
    retrained = rng.normal(0.0, 1.0, (m, n)) * scale
    same = rng.normal(0.0, 1.0, (m, n)) * scale
    shifted = same + 3.0 * scale
    eps_same = A.forget_epsilons(same, retrained)
    assert eps_same.shape == (n,) and np.all(eps_same >= 0)
    assert A.forget_score(same, retrained) > 0.85
    assert A.forget_score(shifted, retrained) < 0.15
    assert 0.15 < A.forget_score(same + 1.0 * scale, retrained) < 0.85
    assert A.forget_score(0.3 * same + scale, retrained) < 0.3
    # Challenge point estimates overfit the best threshold: identical sets already look leaky.
    assert A.forget_score(same, retrained, confidence=None) < A.forget_score(same, retrained)


def test_forget_epsilons_special_cases() -> None:
    rng = np.random.default_rng(6)
    r = rng.normal(size=(16, 3))
    u = r.copy()
    u[:, 0] += 100.0  # perfectly separated: FPR = FNR = 0 -> inf -> cap with point estimates
    u[:, 1] = 0.5  # a point mass against a spread distribution: "peaky" -> cap
    eps = A.forget_epsilons(u, r, confidence=None, epsilon_cap=50.0)
    assert eps[0] == 50.0 and eps[1] == 50.0 and eps[2] < 50.0
    eps_cp = A.forget_epsilons(u, r)
    assert 1.5 < eps_cp[0] < 50.0 and eps_cp[1] == 50.0 and eps_cp[2] < 0.5
    points = np.zeros((4, 2))
    points[:, 1] = 1.0
    np.testing.assert_array_equal(A.forget_epsilons(points, np.zeros((4, 2))), [0.0, 50.0])
    with pytest.raises(ValueError):
        A.forget_epsilons(u, r[:, :2])


# -- plot ------------------------------------------------------------------------------------


def test_plot_roc_writes_png(tmp_path) -> None:
    rng = np.random.default_rng(7)
    curves = {
        "leaky": A.roc_curve(rng.normal(1, 1, 300), rng.normal(0, 1, 300)),
        "chance": A.roc_curve(rng.normal(0, 1, 300), rng.normal(0, 1, 300)),
    }
    out = A.plot_roc(curves, tmp_path / "sub" / "roc.png", title="MIA")
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_abs_gaps_judges_absolute_gaps_seed_by_seed():
    from scipy import stats

    from mini_unlearn_jax.evaluation.metrics import compare_abs_gaps

    c = compare_abs_gaps([0.01, -0.02, 0.03], [-0.03, 0.01, 0.02])  # signs do not matter, sizes do
    np.testing.assert_allclose(c["mean_abs"], (0.02, 0.02), atol=1e-12)
    assert c["no_larger"]  # equal means count as no larger
    diff = np.array([-0.02, 0.01, 0.01])
    half = stats.t.ppf(0.975, 2) * diff.std(ddof=1) / np.sqrt(3)
    np.testing.assert_allclose(c["difference"], (0.0, -half, half), atol=1e-12)
    assert not compare_abs_gaps([0.05, 0.04], [0.01, -0.01])["no_larger"]
