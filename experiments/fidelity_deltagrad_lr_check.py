"""Why DeltaGrad's logreg rows in the fidelity table are so poor: its default step size.

``methods.deltagrad_config`` gives full-batch DeltaGrad ``lr=0.5``. On Fashion-MNIST (pixels in
[0, 1]) the largest eigenvalue of ``E[x x^T]`` (bias included) is about 111, so the logistic
regression Hessian at the uniform-softmax init has ``L ~ 0.1 * 111 ~ 11`` and plain GD needs
``lr < 2 / L ~ 0.18``. With ``lr=0.5`` the objective oscillates along the trajectory, the trained
model is poor, and DeltaGrad's replay ends far from its own retrain. With ``lr=0.1`` the same
code is accurate. Run::

    python experiments/fidelity_deltagrad_lr_check.py [--n-train 60000] [--ratio 0.01] [--lrs 0.5,0.1]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mini_unlearn_jax.app.data import load_dataset
from mini_unlearn_jax.core import deltagrad as dg
from mini_unlearn_jax.core.models import build_model, init_params, make_objective
from mini_unlearn_jax.evaluation.metrics import accuracy, predict_probs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--lrs", default="0.5,0.1")
    args = p.parse_args()
    ds = load_dataset(f"fashion_mnist:n_train={args.n_train}")
    xb = np.concatenate([ds.x_train.reshape(ds.n_train, -1), np.ones((ds.n_train, 1), np.float32)], 1)
    lmax = float(np.linalg.eigvalsh(xb.T.astype(np.float64) @ xb / ds.n_train)[-1])
    print(f"lambda_max(E[x x^T]) = {lmax:.1f}; GD stability at init needs lr < 2/(0.1*lambda_max) = {20 / lmax:.3f}")
    model = build_model("logreg", 10)
    obj = make_objective(model, 1e-3)
    p0 = init_params(model, ds.x_train[0], 0)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    n = ds.n_train
    remove = np.zeros(n, bool)
    remove[np.random.default_rng(0).choice(n, int(round(args.ratio * n)), replace=False)] = True
    _, unravel = ravel_pytree(p0)
    dist = lambda a, b: float(jnp.linalg.norm(ravel_pytree(a)[0] - ravel_pytree(b)[0]))
    acc = lambda w: accuracy(predict_probs(obj, w, ds.x_test), ds.y_test)
    for lr in (float(v) for v in args.lrs.split(",")):
        cfg = dg.DeltaGradConfig(lr=lr, steps=300)
        w, cache = dg.train_with_cache(obj, cfg, p0, x, y)
        traj = [float(obj.value(unravel(cache.params[t]), x, y)) for t in range(0, 300, 50)]
        w_r = dg.retrain(obj, cfg, p0, x, y, remove)
        w_u, info = dg.deltagrad_unlearn(obj, cfg, cache, p0, x, y, remove)
        jax.block_until_ready(w_u)
        print(f"lr={lr}: objective at steps 0,50,..,250 {[round(v, 4) for v in traj]}; test acc own original "
              f"{acc(w):.4f}, own retrain {acc(w_r):.4f}, DeltaGrad {acc(w_u):.4f}; "
              f"rel err ||w_U-w_R||/||w-w_R|| = {dist(w_u, w_r) / dist(w, w_r):.3f}; finite={info.finite}")


if __name__ == "__main__":
    main()
