"""Each baseline against an oracle on a small problem."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from mini_unlearn_jax.app.data import synthetic
from mini_unlearn_jax.core import deltagrad as dg
from mini_unlearn_jax.core import linalg as cv
from mini_unlearn_jax.core import methods as M
from mini_unlearn_jax.core import registry as R
from mini_unlearn_jax.core.models import build_model, init_params, make_objective
from mini_unlearn_jax.core.training import TrainConfig, Trainer
from mini_unlearn_jax.evaluation.metrics import rel_param_error


@pytest.fixture(scope="module")
def problem():
    ds = synthetic(n=400, n_test=100, d=6, classes=3, seed=5, sep=1.0)
    model = build_model("logreg", 3)
    obj = make_objective(model, 5e-2)
    cfg = TrainConfig(optimizer="lbfgs", steps=400, tol=1e-7)
    p0 = init_params(model, ds.x_train[0], 0)
    st = Trainer(obj, cfg).fit(p0, ds.x_train, ds.y_train)
    return M.Problem(obj, cfg, p0, st.params, st.snapshots, cv.fit_stats(obj, st.params, ds.x_train),
                     jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))


FORGET = np.arange(0, 400, 5)


def test_newton_converges_to_the_retrained_minimizer(problem):
    ret = R.run_method("retrain", problem, FORGET)
    one = R.run_method("newton", problem, FORGET)
    assert one.converged
    # one exact Newton step from w* on a strongly convex problem: far closer than doing nothing
    assert rel_param_error(one.params, ret.params, problem.params) < 0.05


def test_finetune_with_many_steps_approaches_the_retrained_minimizer(problem):
    ret = R.run_method("retrain", problem, FORGET)
    few = R.run_method("finetune", problem, FORGET, steps=2)
    many = R.run_method("finetune", problem, FORGET, steps=200)
    e_few = rel_param_error(few.params, ret.params, problem.params)
    e_many = rel_param_error(many.params, ret.params, problem.params)
    assert e_many < 1e-2 and e_many < e_few


def test_neggrad_increases_the_loss_on_the_forget_set(problem):
    out = R.run_method("neggrad", problem, FORGET)
    xf, yf = problem.x[FORGET], problem.y[FORGET]
    assert float(problem.objective.data_loss(out.params, xf, yf)) > float(problem.objective.data_loss(problem.params, xf, yf))


def test_deltagrad_with_exact_steps_only_equals_its_retraining(problem):
    out = R.run_method("deltagrad", problem, FORGET, T0=1, j0=0, steps=60, lr=0.5)
    ref = M.deltagrad_retrain(problem, FORGET, T0=1, j0=0, steps=60, lr=0.5)
    assert out.converged
    np.testing.assert_allclose(ravel_pytree(out.params)[0], ravel_pytree(ref.params)[0], atol=1e-5)
    assert out.info["cache_bytes"] == 2 * 60 * 21 * 4


def test_deltagrad_blow_up_is_reported(problem, monkeypatch):
    real = dg.deltagrad_unlearn

    def exploding(*args, **kw):
        params, info = real(*args, **kw)
        return jax.tree.map(lambda p: p * 1e3, params), info

    monkeypatch.setattr(dg, "deltagrad_unlearn", exploding)
    out = R.run_method("deltagrad", problem, FORGET, steps=30)
    assert not out.converged and "diverged" in out.reason
    np.testing.assert_array_equal(ravel_pytree(out.params)[0], ravel_pytree(out.info["own_original"])[0])


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        R.run_method("bogus", None, [1])


def test_newton_is_exact_in_one_step_on_a_quadratic():
    from test_unlearn import _ridge, _ridge_solution

    obj, params0, x, y = _ridge()
    cfg = TrainConfig(optimizer="lbfgs", steps=300, tol=1e-6)
    st = Trainer(obj, cfg).fit(params0, x, y)
    pb = M.Problem(obj, cfg, params0, st.params, st.snapshots, None, jnp.asarray(x), jnp.asarray(y))
    forget = np.arange(0, 120, 4)
    keep = np.ones(120, bool)
    keep[forget] = False
    out = R.run_method("newton", pb, forget)
    w = np.concatenate([np.asarray(out.params["kernel"])[:, 0], np.asarray(out.params["bias"])])
    np.testing.assert_allclose(w, _ridge_solution(x, y, keep, obj.l2), atol=1e-4)
