"""Scratch probe (negative result): first-order "unrolling" of the removed examples' Adam updates.

Idea tested on the leaky MLP of experiments/privacy.py (2,000 images, 1,600 Adam steps): the
removed examples' gradients are ~0 at the memorising w* but large earlier on the trajectory, so
add back, segment by segment between K = 8 Adam checkpoints, the update they contributed,

    w_U = w* + s * sum_k L_k * lr/n * sum_R grad l_i(w_k) / (sqrt(nu_k) + eps)

(nu_k: Adam's bias-corrected second moment at checkpoint k, L_k the segment's steps), then
fine-tune 160 Adam steps (10 % of training) on the remaining data. ``s = 1`` is the first-order
estimate; it ignores how later steps contract earlier pushes, and overshoots. Prints test
accuracy, forget / held-out loss, KL to the retrained model, loss-attack and LiRA-online AUC
(16 shadows) for several scales ``s``.

    python experiments/mlp_unroll_probe.py 0.1          # removal ratio
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import mini_unlearn_jax as mu
from mini_unlearn_jax.core import methods as M
from mini_unlearn_jax.core.mini import pad_request, removed_grad_sum
from mini_unlearn_jax.core.training import TrainConfig, Trainer
from mini_unlearn_jax.evaluation import privacy as P
from mini_unlearn_jax.evaluation.metrics import accuracy, mean_kl, predict_probs

ratio = float(sys.argv[1]) if len(sys.argv) > 1 else 0.1
K = 8
ds = mu.load_dataset("fashion_mnist:n_train=2000")
model = mu.build_model("mlp", 10, hidden=256); obj = mu.make_objective(model, 1e-5)
steps = 1600; lr = 1e-3; n = 2000
cfg = TrainConfig(optimizer="adam", learning_rate=lr, steps=steps, batch_size=128, tol=0.0, seed=0, snapshots=8, snapshot_every=200, chunk=400)
p0 = mu.init_params(model, ds.x_train[0], 0)
x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
tr = Trainer(obj, cfg); s = tr.init(p0); ones = jnp.ones(n)
pts = [(0, p0, None)]
chunk = jax.jit(lambda s_: tr._chunk(s_, x, y, ones, 200))
for k in range(K):
    s = chunk(s); a = s.opt_state[0]; T = int(a.count)
    pts.append((T, s.params, jax.tree.map(lambda v: v / (1 - 0.999 ** T), a.nu)))
w_star = s.params
r = int(round(ratio * n))
forget = np.sort(np.random.default_rng([0, r]).choice(n, size=r, replace=False))
pb = M.Problem(obj, cfg, p0, w_star, None, None, x, y)
ret = M.run_method("retrain", pb, forget).params
held = np.sort(np.random.default_rng(0).choice(len(ds.x_test), 600, replace=False))
xh, yh = ds.x_test[held], ds.y_test[held]
t0 = time.time()
sset, _ = P.train_shadow_set(obj, lambda kk: model.init(kk, x[:1])["params"], np.concatenate([ds.x_train, xh]), np.concatenate([ds.y_train, yh]), num_shadows=16, recipe=P.shadow_recipe(cfg), seed=1)
print("shadows", time.time() - t0, flush=True)
idx, mask = pad_request(forget, n, 64)
xr, yr, mk = x[idx], y[idx], jnp.asarray(mask)
gsum = jax.jit(lambda w: removed_grad_sum(obj, w, xr, yr, mk, 256))
delta = jax.tree.map(jnp.zeros_like, p0)
for j in range(1, len(pts)):
    L = pts[j][0] - pts[j - 1][0]
    delta = jax.tree.map(lambda d, gg, v: d + L * lr / n * gg / (jnp.sqrt(v) + 1e-8), delta, gsum(pts[j][1]), pts[j][2])
models = {"original": w_star, "retrain": ret}
for sc in (0.5, 1.0):
    models[f"s{sc} raw"] = jax.tree.map(lambda a, d: a + sc * d, w_star, delta)
for sc in (0.3, 0.4, 0.5, 0.6, 0.8):
    w = jax.tree.map(lambda a, d: a + sc * d, w_star, delta)
    for k in (160,):
        pb2 = M.Problem(obj, cfg, p0, w, None, None, x, y)
        models[f"s{sc} ft{k}"] = M.run_method("finetune", pb2, forget, steps=k).params
rep = P.full_suite(obj, models, ds.x_train[forget], ds.y_train[forget], xh, yh, shadows=(sset.take(forget), sset.take(n + np.arange(len(xh)))), learned=False, seed=0)[0]["models"]
pr = predict_probs(obj, ret, ds.x_test)
for name, w in models.items():
    p = predict_probs(obj, w, ds.x_test); pf = predict_probs(obj, w, ds.x_train[forget]); ph = predict_probs(obj, w, xh)
    fl = float(np.mean(-np.log(np.clip(pf[np.arange(r), ds.y_train[forget]], 1e-12, 1))))
    hl = float(np.mean(-np.log(np.clip(ph[np.arange(len(xh)), yh], 1e-12, 1))))
    print(f"{name:16s} test {accuracy(p, ds.y_test):.4f} forget loss {fl:.3f} held loss {hl:.3f} KL {mean_kl(pr, p):.4f} loss {rep[name]['loss']['auc']:.3f} lira {rep[name]['lira_online']['auc']:.3f}", flush=True)
