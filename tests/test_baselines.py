"""The neural-network baselines (core/baselines.py) move the removed examples' loss as their
papers say, on a small MLP that memorises its training set."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mini_unlearn_jax.app.data import synthetic
from mini_unlearn_jax.core import baselines as B
from mini_unlearn_jax.core import registry as R
from mini_unlearn_jax.core.models import build_model, init_params, make_objective
from mini_unlearn_jax.core.problem import Problem
from mini_unlearn_jax.core.training import TrainConfig, Trainer

FORGET = np.arange(0, 300, 5)  # 20 %
KEEP = np.setdiff1d(np.arange(300), FORGET)


@pytest.fixture(scope="module")
def memorised():
    ds = synthetic(n=300, n_test=100, d=20, classes=4, seed=3, sep=0.45)
    model = build_model("mlp", 4, hidden=64)
    obj = make_objective(model, 1e-5)
    cfg = TrainConfig(optimizer="adam", learning_rate=3e-3, steps=400, batch_size=32, tol=0.0, seed=0,
                      snapshots=1, chunk=400)
    p0 = init_params(model, ds.x_train[0], 0)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    return Problem(obj, cfg, p0, Trainer(obj, cfg).fit(p0, x, y).params, None, None, x, y)


def _loss(pb, params, rows):
    return float(jnp.mean(pb.objective.losses(params, pb.x[rows], pb.y[rows])))


@pytest.mark.slow
def test_every_baseline_raises_the_removed_examples_loss(memorised):
    pb = memorised
    before_f, before_r = _loss(pb, pb.params, FORGET), _loss(pb, pb.params, KEEP)
    for name in ("finetune", "neggrad-plus", "l1-sparse", "salun", "scrub"):
        out = R.run_method(name, pb, FORGET)
        assert out.converged and out.info["steps"] == B.default_steps(pb.train_config) == 60, name
        assert _loss(pb, out.params, FORGET) > 1.5 * before_f, name  # the memorised examples are forgotten
    # SCRUB's max-steps push the removed examples' loss far up while its min-steps keep the rest fitted
    scrub = R.run_method("scrub", pb, FORGET)
    assert _loss(pb, scrub.params, FORGET) > 5 * before_f and _loss(pb, scrub.params, KEEP) < 2 * before_r
    # gradient ascent: more steps, higher loss on the removed examples
    few, more = (B.run_neggrad(pb, FORGET, steps=s) for s in (5, 20))
    assert before_f < _loss(pb, few.params, FORGET) < _loss(pb, more.params, FORGET)


def test_neggrad_plus_weighs_ascent_against_descent(memorised):
    pb = memorised
    mild, strong = (B.run_neggrad_plus(pb, FORGET, alpha=a) for a in (0.99, 0.9))
    assert _loss(pb, strong.params, FORGET) > _loss(pb, mild.params, FORGET)
    assert _loss(pb, mild.params, KEEP) < _loss(pb, pb.params, KEEP)  # the descent term keeps the rest fitted


def test_l1_sparse_lowers_the_l1_norm_against_plain_fine_tuning(memorised):
    pb = memorised
    plain, sparse = (B.run_l1_sparse(pb, FORGET, gamma=g) for g in (0.0, 5e-4))
    assert float(B.l1_norm(sparse.params)) < 0.97 * float(B.l1_norm(plain.params))


@pytest.mark.slow
def test_salun_moves_only_the_salient_weights(memorised):
    pb = memorised
    out = B.run_salun(pb, FORGET, sparsity=0.5)
    mask = B.saliency_mask(pb.objective, pb.params, pb.x[FORGET], pb.y[FORGET], 0.5)
    moved = jax.tree.map(lambda a, b: np.asarray(a != b), out.params, pb.params)
    frozen = jax.tree.map(lambda m: np.asarray(m == 0), mask)
    n_frozen = sum(int(f.sum()) for f in jax.tree.leaves(frozen))
    assert n_frozen >= 0.45 * sum(f.size for f in jax.tree.leaves(frozen))
    # Adam's update is exactly zero where every gradient was: the unsalient weights are copies
    assert not any(bool((m & f).any()) for m, f in zip(jax.tree.leaves(moved), jax.tree.leaves(frozen), strict=True))
    assert sum(int(m.sum()) for m in jax.tree.leaves(moved)) > 0


def test_methods_that_train_on_the_rest_never_read_the_removed_rows(memorised):
    pb = memorised
    y_other = pb.y.at[FORGET].set((pb.y[FORGET] + 1) % 4)
    x_other = pb.x.at[FORGET].set(0.0)
    changed = Problem(pb.objective, pb.train_config, pb.params0, pb.params, None, None, x_other, y_other)
    for name in ("finetune", "l1-sparse", "from-init"):
        a, b = R.run_method(name, pb, FORGET), R.run_method(name, changed, FORGET)
        for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=name)


def test_a_diverged_baseline_returns_the_trained_model_and_bad_options_say_what_is_wrong(memorised):
    pb = memorised
    out = B.run_neggrad(pb, FORGET, steps=50, lr=1e30)
    assert not out.converged and "diverged" in out.reason
    for u, v in zip(jax.tree.leaves(out.params), jax.tree.leaves(pb.params), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    with pytest.raises(ValueError, match="alpha"):
        B.run_neggrad_plus(pb, FORGET, alpha=1.5)
    with pytest.raises(ValueError, match="sparsity"):
        B.run_salun(pb, FORGET, sparsity=1.0)
    with pytest.raises(ValueError, match="gamma"):
        B.run_l1_sparse(pb, FORGET, gamma=-1.0)
