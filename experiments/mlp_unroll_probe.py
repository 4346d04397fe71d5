"""Scratch probe (negative result): first-order "unrolling" of the removed examples' Adam updates.

Idea tested: the removed examples' gradients are ~0 at the memorising w* but large earlier on
the trajectory, so add back, segment by segment between K Adam checkpoints, the update they
contributed: w_U = w* + sum_k L_k * lr/n * sum_R grad l_i(w_k) / (sqrt(nu_k) + eps) (nu_k:
Adam's bias-corrected second moment at the checkpoint), optionally followed by fine-tuning
on the remaining data. It ignores how later steps contract earlier pushes, and overshoots
(see the README's MLP limits paragraph for the figures this printed). Leaky MLP of
experiments/privacy.py, loss attack only.

    python experiments/mlp_unroll_probe.py 0.1 8        # ratio, number of checkpoints K
"""
import numpy as np, jax, jax.numpy as jnp, sys
import mini_unlearn_jax as mu
from mini_unlearn_jax import methods as M, privacy as P
from mini_unlearn_jax.metrics import accuracy, predict_probs, mean_kl
from mini_unlearn_jax.training import TrainConfig, Trainer
from mini_unlearn_jax.mini import removed_grad_sum, pad_request

ratio = float(sys.argv[1]); K = int(sys.argv[2])
ds = mu.load_dataset("fashion_mnist:n_train=2000")
model = mu.build_model("mlp", 10, hidden=256); obj = mu.make_objective(model, 1e-5)
steps = 1600; lr = 1e-3
cfg = TrainConfig(optimizer="adam", learning_rate=lr, steps=steps, batch_size=128, tol=0.0, seed=0, snapshots=8, snapshot_every=200, chunk=400)
p0 = mu.init_params(model, ds.x_train[0], 0)
x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
n = 2000
tr = Trainer(obj, cfg); s = tr.init(p0); ones = jnp.ones(n)
seg = steps // K
pts = [(0, p0, None)]
chunk = jax.jit(lambda s_: tr._chunk(s_, x, y, ones, seg))
for k in range(K):
    s = chunk(s)
    a = s.opt_state[0]; T = int(a.count)
    pts.append((T, s.params, jax.tree.map(lambda v: v / (1 - 0.999 ** T), a.nu)))
w_star = s.params
r = int(round(ratio * n))
forget = np.sort(np.random.default_rng([0, r]).choice(n, size=r, replace=False))
pb = M.Problem(obj, cfg, p0, w_star, None, None, x, y)
ret = M.run_method("retrain", pb, forget).params
held = np.sort(np.random.default_rng(0).choice(len(ds.x_test), 600, replace=False))
idx, mask = pad_request(forget, n, 64)
xr, yr, mk = x[idx], y[idx], jnp.asarray(mask)
gsum = jax.jit(lambda w: removed_grad_sum(obj, w, xr, yr, mk, 256))
def run(label, w):
    p = predict_probs(obj, w, ds.x_test); pr = predict_probs(obj, ret, ds.x_test)
    pf = predict_probs(obj, w, ds.x_train[forget])
    fl = float(np.mean(-np.log(np.clip(pf[np.arange(r), ds.y_train[forget]], 1e-12, 1))))
    auc = P.default_mia(obj, {"m": w}, ds.x_train[forget], ds.y_train[forget], ds.x_test[held], ds.y_test[held])["m"]["auc"]
    print(f"{label:28s} test {accuracy(p, ds.y_test):.4f} forget acc {accuracy(pf, ds.y_train[forget]):.3f} forget loss {fl:.3f} KL {mean_kl(pr, p):.4f} lossAUC {auc:.3f}", flush=True)
    return w
run("original", w_star); run("retrain", ret)
# right-endpoint rule: segment (t_{k-1}, t_k] uses gradient at w_{t_{k-1}} (left) and nu at t_k
for rule in ("left", "right", "mid"):
    delta = jax.tree.map(jnp.zeros_like, p0)
    for j in range(1, len(pts)):
        L = pts[j][0] - pts[j - 1][0]
        gl, gr = gsum(pts[j - 1][1]), gsum(pts[j][1])
        g = gl if rule == "left" else gr if rule == "right" else jax.tree.map(lambda a, b: 0.5 * (a + b), gl, gr)
        nu = pts[j][2]
        delta = jax.tree.map(lambda d, gg, v: d + L * lr / n * gg / (jnp.sqrt(v) + 1e-8), delta, g, nu)
    for scale in (0.5, 1.0):
        w = run(f"unroll {rule} x{scale}", jax.tree.map(lambda a, d: a + scale * d, w_star, delta))
        for k in (32, 160):
            pb2 = M.Problem(obj, cfg, p0, w, None, None, x, y)
            run(f"  + ft {k}", M.run_method("finetune", pb2, forget, steps=k).params)
