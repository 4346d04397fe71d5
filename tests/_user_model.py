"""A researcher's own model, loss and optax loop, used by tests/test_user_model.py.

``python tests/_user_model.py restore RUN_DIR`` restores the run saved by the test in a fresh
process and runs every applicable registered method on it through the public API, printing
JSON. ``python tests/_user_model.py conditioning`` prints `mini`'s relative error to the user's
retraining for two L2 coefficients and both generic curvature paths (the README's figures).
Nothing here uses the package's Trainer or TrainConfig.
"""

from __future__ import annotations

import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mini_unlearn_jax as mu

STEPS, K, EVERY, LR, L2 = 500, 6, 70, 0.1, 0.1


class Scorer(nn.Module):
    """A linear scorer of the user's own (not the package's LogisticRegression)."""

    classes: int = 3

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.classes, name="head")(x.reshape((x.shape[0], -1)))


def smoothed_ce(logits, y):
    """Cross-entropy with label smoothing 0.1: the user's own per-example loss."""
    target = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), 0.1)
    return optax.softmax_cross_entropy(logits, target)


def other_loss(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def objective(loss=smoothed_ce):
    return mu.make_objective(Scorer(), L2, example_loss=loss, penalize_bias=True, convex=True)  # a linear scorer


def data():
    rng = np.random.default_rng(0)
    n, d = 240, 6
    centers = rng.normal(size=(3, d)) * 1.5
    y = rng.integers(0, 3, n)
    x = (centers[y] + rng.normal(size=(n, d))).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y, jnp.int32)


def init(x):
    return Scorer().init(jax.random.key(0), x[:1])["params"]


def train(params0, x, y, weights=None):
    """The user's loop: full-batch Adam in a lax.scan, threading the snapshot buffer; the buffer
    takes a gradient function that it calls only on the steps it records."""
    obj = objective()
    weights = jnp.ones(x.shape[0]) if weights is None else weights
    opt = optax.adam(optax.cosine_decay_schedule(LR, STEPS))
    buf = mu.snapshot_buffer(K, EVERY)
    grad_fn = mu.data_grad_fn(obj, x, y, weights)

    def step(carry, t):
        p, s, b = carry
        g = jax.grad(obj.value)(p, x, y, weights)
        u, s = opt.update(g, s, p)
        p = optax.apply_updates(p, u)
        b = buf.update(b, t + 1, p, grad_fn)
        return (p, s, b), None

    (p, _, b), _ = jax.lax.scan(step, (params0, opt.init(params0), buf.init(params0)), jnp.arange(STEPS))
    b = buf.update(b, STEPS, p, grad_fn, force=True)  # the newest entry is w*
    return p, b


def recipe(params0, x, y, weights):
    """The ground-truth recipe as a function (what `retrain` calls)."""
    return jax.jit(train)(params0, x, y, weights)[0]


def restore(run_dir: str) -> dict:
    x, y = data()
    run = mu.load_run(run_dir, objective=objective(), like=init(x))
    problem = run.problem(x, y, recipe=recipe)
    forget = np.arange(0, 240, 8)  # 30 examples
    out = {"methods": list(mu.METHODS), "results": {}, "skipped": {}}
    for name in mu.METHODS:
        why = mu.applicable(name, problem)
        if why:
            out["skipped"][name] = why
            continue
        res = mu.run_method(name, problem, forget)
        out["results"][name] = {"converged": res.converged, "reason": res.reason,
                                "params": [np.asarray(a).tolist() for a in jax.tree.leaves(res.params)]}
    out["saved_params"] = [np.asarray(a).tolist() for a in jax.tree.leaves(run.params)]
    return out


def conditioning() -> None:
    """`mini` on this model at L2 0.1 and 0.03 (every parameter penalised), lbfgs and exact curvature."""
    global L2
    x, y = data()
    p0 = init(x)
    flat = lambda t: np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(t)])
    forget = np.arange(0, 240, 8)
    keep = np.ones(240, np.float32)
    keep[forget] = 0
    for l2 in (0.1, 0.03):
        L2 = l2
        jax.clear_caches()  # `train` reads L2 when traced: drop the trace of the previous coefficient
        w, buf = jax.jit(train)(p0, x, y)
        ref = jax.jit(train)(p0, x, y, jnp.asarray(keep))[0]
        problem = mu.Problem(objective(), recipe, p0, w, buf, None, x, y)
        for curvature in ("lbfgs", "exact"):
            res = mu.run_method("mini", problem, forget, curvature=curvature)
            err = np.linalg.norm(flat(res.params) - flat(ref)) / np.linalg.norm(flat(w) - flat(ref))
            print(f"L2 {l2}: mini (curvature={curvature}) {res.info['status']} after {res.info['iterations']} "
                  f"iterations, relative error {err:.3f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["restore"]:
        print(json.dumps(restore(sys.argv[2])))
    elif sys.argv[1:2] == ["conditioning"]:
        conditioning()
