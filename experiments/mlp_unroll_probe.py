"""Scratch probe (negative result): first-order "unrolling" of the removed examples' Adam updates.

Idea tested on the leaky MLP of experiments/privacy.py (the ``leaky-mlp`` recipe: 2,000 images,
1,600 Adam steps): the removed examples' gradients are ~0 at the memorising w* but large earlier
on the trajectory, so add back, segment by segment between K = 8 Adam checkpoints, the update
they contributed,

    w_U = w* + s * sum_k L_k * lr/n * sum_R grad l_i(w_k) / (sqrt(nu_k) + eps)

(nu_k: Adam's bias-corrected second moment at checkpoint k, L_k the segment's steps), then
fine-tune 160 Adam steps (10 % of training) on the remaining data. ``s = 1`` is the first-order
estimate; it ignores how later steps contract earlier pushes, and overshoots. Prints test
accuracy, forget / held-out loss, KL to the retrained model, loss-attack and LiRA-online AUC
(16 shadows) for several scales ``s``.

    python experiments/mlp_unroll_probe.py 0.1          # removal ratio
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mini_unlearn_jax.app import recipes
from mini_unlearn_jax.core import methods as M
from mini_unlearn_jax.core.mini import pad_request, removed_grad_sum
from mini_unlearn_jax.evaluation import privacy as P
from mini_unlearn_jax.evaluation.metrics import accuracy, mean_kl, predict_probs

RECIPE, SEED = "leaky-mlp", 0
BETA2, EPS = 0.999, 1e-8  # optax.adam's defaults, which the recipe's optimizer uses
RAW_SCALES = (0.5, 1.0)
FT_SCALES, FT_STEPS = (0.3, 0.4, 0.5, 0.6, 0.8), 160
N_HELD, N_SHADOWS = 600, 16


def mean_nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1))))


def train():
    """The recipe with its Adam state kept at every snapshot step (K = 8 checkpoints after step 0)."""
    cfg = recipes.RECIPES[RECIPE][4](SEED)
    schedule = tuple(range(0, cfg.steps + 1, cfg.snapshot_every))
    return recipes.recipe(RECIPE, SEED, trajectory={"schedule": schedule, "with_opt_state": True, "keep_snapshots": False})


def unrolled_delta(problem, traj, forget) -> dict:
    """sum_k L_k * lr/n * sum_R grad l_i(w_k) / (sqrt(nu_k) + eps) over the checkpoints k >= 1."""
    obj, lr, n = problem.objective, problem.recipe.learning_rate, int(problem.x.shape[0])
    idx, mask = pad_request(forget, n, 64)
    xr, yr, mk = problem.x[idx], problem.y[idx], jnp.asarray(mask)
    gsum = jax.jit(lambda w: removed_grad_sum(obj, w, xr, yr, mk, 256))
    steps = [int(s) for s in np.asarray(traj.steps)]
    delta = jax.tree.map(jnp.zeros_like, problem.params0)
    for k in range(1, len(steps)):
        w_k = jax.tree.map(lambda a, k=k: a[k], traj.params)
        nu_k = jax.tree.map(lambda v, k=k: v[k] / (1 - BETA2 ** steps[k]), traj.opt_state[0].nu)
        seg = steps[k] - steps[k - 1]
        delta = jax.tree.map(lambda d, g, v, seg=seg: d + seg * lr / n * g / (jnp.sqrt(v) + EPS),
                             delta, gsum(w_k), nu_k)
    return delta


def main() -> int:
    ratio = float(sys.argv[1]) if len(sys.argv) > 1 else 0.1
    tr = train()
    problem, ds, obj = tr.problem, tr.dataset, tr.problem.objective
    n = ds.n_train
    w_star = problem.params
    r = int(round(ratio * n))
    forget = np.sort(np.random.default_rng([SEED, r]).choice(n, size=r, replace=False))
    ret = M.run_method("retrain", problem, forget).params
    held = np.sort(np.random.default_rng(SEED).choice(len(ds.x_test), N_HELD, replace=False))
    xh, yh = ds.x_test[held], ds.y_test[held]

    t0 = time.time()
    sset, _ = P.train_shadow_set(obj, lambda key: tr.model.init(key, problem.x[:1])["params"],
                                 np.concatenate([ds.x_train, xh]), np.concatenate([ds.y_train, yh]),
                                 num_shadows=N_SHADOWS, recipe=P.shadow_recipe(problem.recipe), seed=SEED + 1)
    print("shadows", time.time() - t0, flush=True)

    delta = unrolled_delta(problem, problem.extras["trajectory"].state, forget)
    scaled = lambda s: jax.tree.map(lambda a, d: a + s * d, w_star, delta)
    models = {"original": w_star, "retrain": ret}
    for s in RAW_SCALES:
        models[f"s{s} raw"] = scaled(s)
    for s in FT_SCALES:
        start = dataclasses.replace(problem, params=scaled(s))
        models[f"s{s} ft{FT_STEPS}"] = M.run_method("finetune", start, forget, steps=FT_STEPS).params

    xf, yf = ds.x_train[forget], ds.y_train[forget]
    rep = P.full_suite(obj, models, xf, yf, xh, yh, shadows=(sset.take(forget), sset.take(n + np.arange(len(xh)))),
                       learned=False, seed=SEED)[0]["models"]
    p_ret = predict_probs(obj, ret, ds.x_test)
    for name, w in models.items():
        p = predict_probs(obj, w, ds.x_test)
        fl = mean_nll(predict_probs(obj, w, xf), yf)
        hl = mean_nll(predict_probs(obj, w, xh), yh)
        print(f"{name:16s} test {accuracy(p, ds.y_test):.4f} forget loss {fl:.3f} held loss {hl:.3f} "
              f"KL {mean_kl(p_ret, p):.4f} loss {rep[name]['loss']['auc']:.3f} "
              f"lira {rep[name]['lira_online']['auc']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
