"""Unlearning at scale on HIGGS-shaped data: time ratio, memory and fidelity against retraining.

    python benchmarks/higgs_shaped.py [--n 1000000] [--quick] [--out benchmarks/results]

writes OUT/higgs_shaped.{md,json} (OUT/higgs_shaped_quick.{md,json} with --quick, n = 100,000).

Data (synthetic, seeded; the real HIGGS set is not available offline): HIGGS's shape -- 28
features, 2 classes, ~53 % signal -- with HIGGS-like marginals: 21 "low-level" features laid out
as HIGGS's (lepton pT, eta, phi; missing-energy magnitude and phi; four jets with pT, eta, phi
and a b-tag in {0, 1.1, 2.2}; pT-like features log-normal, angles uniform in [-pi, pi], eta
Gaussian) and 7 "high-level" invariant-mass-like features (log-normal, correlated with the jets'
pT). Labels come from a seeded logistic ground truth on the standardised features (a logistic
model reaches about the accuracy it reaches on HIGGS, ~0.64) with 5 % of the labels flipped.
Features are standardised with the training set's mean and scale.

Model: 2-class multinomial logistic regression, l2 = 1e-3 on every parameter (bias included:
``make_objective(..., penalize_bias=True)``, so that :func:`mini_unlearn_jax.core.certificate.certify`
gives a bound; ``--bias-free`` runs the project's default objective instead), trained full batch
with L-BFGS by the project's default recipe. For each removal ratio (uniform random R) the
methods run side by side through ``mini_unlearn_jax.core.methods.run_method``: ``retrain`` (ground
truth), ``mini`` and ``mini-lite``; then the refresh for the next request
(``methods.refresh_for_next_request``) and the certificate pass. Times exclude compilation
(reported apart). Absolute times on a shared machine are noisy; the ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import mini_unlearn_jax as mu
from mini_unlearn_jax.app.data import validate
from mini_unlearn_jax.core import certificate as cert
from mini_unlearn_jax.core import methods as M
from mini_unlearn_jax.core import registry as R
from mini_unlearn_jax.core.snapshots import nbytes
from mini_unlearn_jax.evaluation import metrics as mt

T0 = time.perf_counter()
L2 = 1e-3


def log(msg):
    print(f"[higgs {time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def higgs_like(n: int, n_test: int, seed: int = 0) -> mu.Dataset:
    """HIGGS-shaped synthetic data: [n, 28] float32 features, labels in {0, 1} (see the module doc)."""
    rng = np.random.default_rng(seed)
    total = n + n_test
    cols = []

    def pt():
        return rng.lognormal(0.0, 0.5, total).astype(np.float32)

    def eta():
        return rng.normal(0.0, 1.0, total).astype(np.float32)

    def phi():
        return rng.uniform(-np.pi, np.pi, total).astype(np.float32)

    cols += [pt(), eta(), phi()]  # lepton
    cols += [pt(), phi()]  # missing energy
    jets_pt = []
    for _ in range(4):  # jets: pT, eta, phi, b-tag
        p = pt()
        jets_pt.append(p)
        cols += [p, eta(), phi(), rng.choice(np.array([0.0, 1.1, 2.2], np.float32), total, p=[0.5, 0.3, 0.2])]
    logs = np.log(np.stack(jets_pt + [cols[0], cols[3]], 1))  # [total, 6]
    for _ in range(7):  # invariant-mass-like: log-normal, correlated with the objects' pT
        mix = rng.dirichlet(np.ones(6))
        cols.append(np.exp(logs @ mix + 0.3 * rng.normal(size=total)).astype(np.float32))
    x = np.stack(cols, 1)
    del cols, logs
    assert x.shape == (total, 28)
    mean, scale = x[:n].mean(0), x[:n].std(0) + 1e-6
    x -= mean
    x /= scale
    w_true = np.random.default_rng(seed + 1).normal(0.0, 0.25, 28)  # the same ground truth for every n
    z = x.astype(np.float64) @ w_true + 0.12
    y = (rng.uniform(size=total) < 1.0 / (1.0 + np.exp(-z))).astype(np.int32)
    flip = rng.uniform(size=total) < 0.05
    y[flip] = 1 - y[flip]
    return validate(x[:n], y[:n], x[n:], y[n:], f"higgs_like:n={n},seed={seed}", num_classes=2)


def _theta(params) -> np.ndarray:
    """[d + 1, C] float64: the kernel with the bias as its last row."""
    d = params["Dense_0"]
    return np.vstack([np.asarray(d["kernel"], np.float64), np.asarray(d["bias"], np.float64)[None]])


def _params(theta: np.ndarray):
    return {"Dense_0": {"kernel": jnp.asarray(theta[:-1], jnp.float32), "bias": jnp.asarray(theta[-1], jnp.float32)}}


def _logits64(theta: np.ndarray, x: np.ndarray, chunk: int = 200_000) -> np.ndarray:
    return np.concatenate([x[i:i + chunk].astype(np.float64) @ theta[:-1] + theta[-1] for i in range(0, len(x), chunk)])


def probs64(params, x: np.ndarray) -> np.ndarray:
    """Class probabilities in float64 (the model is linear: no float32 rounding in the KL figures)."""
    z = _logits64(_theta(params), x)
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def exact_optimum(params, x: np.ndarray, y: np.ndarray, keep: np.ndarray, penalize_bias: bool, iters: int = 8):
    """The remaining-data optimum to float64 precision: Newton's method in numpy from ``params``.

    Returns the [d + 1, C] parameters (bias last) and the final gradient norm."""
    rows = np.flatnonzero(keep > 0)
    xt = np.hstack([x[rows].astype(np.float64), np.ones((rows.size, 1))])
    yk = y[rows]
    m, dp1 = xt.shape
    theta = _theta(params)
    c = theta.shape[1]
    mask = np.ones_like(theta)
    if not penalize_bias:
        mask[-1] = 0.0
    onehot = np.eye(c)[yk]
    gnorm = np.inf
    for _ in range(iters):
        z = xt @ theta
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        g = xt.T @ (p - onehot) / m + L2 * mask * theta
        gnorm = float(np.linalg.norm(g))
        if gnorm < 1e-14:
            break
        h = np.zeros((dp1, c, dp1, c))
        for a in range(c):
            for b in range(c):
                s = p[:, a] * ((a == b) - p[:, b])
                h[:, a, :, b] = xt.T @ (s[:, None] * xt) / m
        h = h.reshape(dp1 * c, dp1 * c) + np.diag(L2 * mask.ravel())
        step = np.linalg.lstsq(h, g.ravel(), rcond=None)[0]  # lstsq: the bias-free softmax has a null direction
        theta = theta - step.reshape(dp1, c)
        if not penalize_bias:
            theta[-1] -= theta[-1].mean()
    return theta, gnorm


def build(ds: mu.Dataset, penalize_bias: bool):
    model = mu.build_model("logreg", 2)
    obj = mu.make_objective(model, L2, penalize_bias=penalize_bias)
    cfg = mu.default_config("logreg", ds.n_train)
    p0 = mu.init_params(model, ds.x_train[0], 0)
    trainer = mu.Trainer(obj, cfg)
    t0 = time.perf_counter()
    st = trainer.fit(p0, ds.x_train, ds.y_train)
    jax.block_until_ready(st.params)
    train_wall = time.perf_counter() - t0
    stats = mu.fit_stats(obj, st.params, ds.x_train)
    problem = M.Problem(obj, cfg, p0, st.params, st.snapshots, stats, jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
    steps = int(st.step)
    dim = sum(a.size for a in jax.tree.leaves(st.params))
    mem = {"param_count": int(dim), "params_bytes": nbytes(st.params), "snapshot_buffer_bytes": nbytes(st.snapshots),
           "curvature_stats_bytes": nbytes(stats) if stats is not None else 0, "train_steps": steps,
           "deltagrad_cache_bytes_same_steps": 2 * steps * dim * 4,
           "training_data_bytes": int(ds.x_train.nbytes + ds.y_train.nbytes)}
    train = {"train_s": train_wall - trainer.compile_s, "train_compile_s": trainer.compile_s,
             "train_grad_norm": float(st.grad_norm)}
    return problem, mem, train


def cell(problem: M.Problem, ds: mu.Dataset, ratio: float, p_orig_test: np.ndarray, methods, penalize_bias: bool,
         seed: int = 0) -> dict:
    n = ds.n_train
    forget = np.sort(np.random.default_rng(seed).choice(n, max(1, int(round(ratio * n))), replace=False))
    keep = M.keep_mask(n, forget)
    obj = problem.objective
    ret = R.run_method("retrain", problem, forget)
    row = {"ratio": ratio, "r": int(forget.size), "retrain_s": ret.time_s, "retrain_compile_s": ret.compile_s,
           "retrain_steps": ret.info["steps"]}
    p_ref = probs64(ret.params, ds.x_test)
    kl0 = mt.mean_kl(p_ref, p_orig_test)
    row["original_kl_test"] = kl0
    theta_x, gx = exact_optimum(ret.params, ds.x_train, ds.y_train, keep, penalize_bias)
    w_exact = np.concatenate([theta_x[-1], theta_x[:-1].ravel()])  # ravel_pytree order: bias, kernel
    flat = lambda p: np.asarray(ravel_pytree(p)[0], np.float64)
    row["exact_grad_norm"] = gx
    row["retrain_dist_to_exact"] = float(np.linalg.norm(flat(ret.params) - w_exact))
    row["original_dist_to_exact"] = float(np.linalg.norm(flat(problem.params) - w_exact))
    c_ret = cert.certify(obj, ret.params, problem.x, problem.y, keep)
    row["retrain_cert"] = c_ret.bound if c_ret.is_bound else None
    row["original_dist_to_retrain"] = mt.param_distance(problem.params, ret.params)
    for m in methods:
        out = R.run_method(m, problem, forget)
        p_u = probs64(out.params, ds.x_test)
        c = cert.certify(obj, out.params, problem.x, problem.y, keep)
        d_exact = float(np.linalg.norm(flat(out.params) - w_exact))
        row[m] = {
            "s": out.time_s, "compile_s": out.compile_s, "converged": out.converged, "reason": out.reason,
            "ratio": out.time_s / ret.time_s,
            "rel_param_error": mt.rel_param_error(out.params, ret.params, problem.params),
            "dist_to_retrain": mt.param_distance(out.params, ret.params),
            "dist_to_exact": d_exact, "rel_error_to_exact": d_exact / row["original_dist_to_exact"],
            "kl_test": mt.mean_kl(p_ref, p_u), "kl_ratio": mt.mean_kl(p_ref, p_u) / max(kl0, 1e-30),
            "agreement_test": mt.agreement(p_ref, p_u),
            "certificate": {"is_bound": c.is_bound, "bound": c.bound, "estimate": c.estimate, "grad_norm": c.grad_norm,
                            "time_s": c.time_s, "compile_s": c.compile_s, "dtype": c.dtype},
            "info": {k: v for k, v in out.info.items() if isinstance(v, (int, float, str, bool))},
        }
        if m == methods[0]:  # the refresh that readies the next request, after the default method
            ref = M.refresh_for_next_request(problem, out.params, forget)
            row["refresh_s"], row["refresh_compile_s"] = ref.time_s, ref.compile_s
            del ref
        row[m]["ratio_with_refresh"] = (out.time_s + row["refresh_s"]) / ret.time_s
        row[m]["ratio_with_certificate"] = (out.time_s + c.time_s) / ret.time_s
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="training rows (default 1,000,000)")
    ap.add_argument("--n-test", type=int, default=100_000, help="test rows for the KL ratio (default 100,000)")
    ap.add_argument("--quick", action="store_true", help="n = 100,000 and 20,000 test rows (a smoke run)")
    ap.add_argument("--ratios", default="0.01,0.1,0.3,0.5", help="removal ratios, comma-separated")
    ap.add_argument("--bias-free", action="store_true", help="the project's default objective (bias unpenalised; no bound)")
    ap.add_argument("--out", default="benchmarks/results", help="output folder")
    ap.add_argument("--stem", default=None, help="output file name without suffix (default higgs_shaped[_quick])")
    args = ap.parse_args()
    if args.quick:
        args.n, args.n_test = 100_000, 20_000
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = ["mini", "mini-lite"]
    results = {"command": "python " + " ".join(sys.argv),
               "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "cpus": os.cpu_count(), "jax": jax.__version__, "device": str(jax.devices()[0]),
                           "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
               "n": args.n, "n_test": args.n_test, "features": 28, "classes": 2, "l2": L2,
               "penalize_bias": not args.bias_free}
    log(f"generating {args.n:,} + {args.n_test:,} rows")
    ds = higgs_like(args.n, args.n_test)
    results["positive_fraction"] = float(ds.y_train.mean())
    log("training")
    problem, mem, train = build(ds, penalize_bias=not args.bias_free)
    results["memory"], results["train"] = mem, train
    p_orig = probs64(problem.params, ds.x_test)
    results["original_test_acc"] = mt.accuracy(p_orig, ds.y_test)
    log(f"trained: {train} test acc {results['original_test_acc']:.4f}; {mem}")
    results["rows"] = []
    for ratio in ratios:
        row = cell(problem, ds, ratio, p_orig, methods, penalize_bias=not args.bias_free)
        results["rows"].append(row)
        log(f"ratio {ratio}: retrain {row['retrain_s']:.2f}s, " + ", ".join(
            f"{m} {row[m]['s']:.3f}s ratio {row[m]['ratio']:.4f} rel err {row[m]['rel_param_error']:.3g} "
            f"KL ratio {row[m]['kl_ratio']:.3g}" for m in methods) + f", refresh {row['refresh_s']:.3f}s")
    results["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results["wall_s"] = time.perf_counter() - T0
    write(results, methods, Path(args.out), args.stem or ("higgs_shaped_quick" if args.quick else "higgs_shaped"))


def write(results: dict, methods, out: Path, stem: str):
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=float))
    mem = results["memory"]
    rows = results["rows"]
    f = lambda v, spec: "n/a" if v is None else format(v, spec)
    md = [f"# HIGGS-shaped unlearning benchmark ({results['n']:,} rows, 28 features, 2 classes)\n",
          f"Command: `{results['command']}`  ",
          f"Machine: {results['machine']}  ",
          f"Run time {results['wall_s'] / 60:.1f} min; peak resident memory {results['peak_rss_bytes'] / 2**30:.2f} GiB.\n",
          "Synthetic data with HIGGS's shape (see `benchmarks/higgs_shaped.py`); logistic regression with "
          f"l2 = {results['l2']} ({'every parameter penalised' if results['penalize_bias'] else 'bias unpenalised'}), "
          f"L-BFGS full batch: {mem['train_steps']} steps, {results['train']['train_s']:.1f} s "
          f"(compile {results['train']['train_compile_s']:.1f} s), test accuracy {results['original_test_acc']:.4f}, "
          f"{results['positive_fraction']:.3f} positive.\n",
          "## Time (compilation apart) against retraining, side by side\n",
          "`mini / retrain` is the solve alone; `+ refresh` adds the pass that readies the next request "
          "(`methods.refresh_for_next_request`: the buffer's gradient and the curvature statistics on the remaining "
          "data); `+ certificate` adds the certificate's exact pass instead.\n",
          "| removed | r | retrain s | " + " | ".join(f"{m} s | {m} / retrain | {m} + refresh | {m} + certificate"
                                                     for m in methods) + " | refresh s |",
          "|---|---|---|" + "---|---|---|---|" * len(methods) + "---|"]
    for r in rows:
        md.append(f"| {r['ratio']:.0%} | {r['r']:,} | {r['retrain_s']:.2f} | " + " | ".join(
            f"{r[m]['s']:.3f} | {r[m]['ratio']:.4f} | {r[m]['ratio_with_refresh']:.4f} | {r[m]['ratio_with_certificate']:.4f}"
            for m in methods) + f" | {r['refresh_s']:.3f} |")
    md += ["\n## Fidelity\n",
           "Against `retrain` (the protocol's ground truth): rel err = ||w_U - w_R|| / ||w* - w_R||, KL ratio = mean "
           "test KL(p_R || p_U) / KL(p_R || p_orig) (probabilities in float64).\n",
           "| removed | " + " | ".join(f"{m} rel err | {m} KL ratio | {m} agreement | {m} converged" for m in methods) + " |",
           "|---|" + "---|---|---|---|" * len(methods)]
    for r in rows:
        md.append(f"| {r['ratio']:.0%} | " + " | ".join(
            f"{r[m]['rel_param_error']:.3g} | {r[m]['kl_ratio']:.3g} | {r[m]['agreement_test']:.5f} | {r[m]['converged']}"
            for m in methods) + " |")
    md += ["\nAgainst the exact remaining-data optimum w_exact (Newton's method in float64 numpy from the retrained "
           "model, final gradient norm shown), with the certificate: `bound` >= ||w - w_exact|| is guaranteed "
           "(`certificate.certify`, one float64 pass over the data; n/a when the objective does not qualify). "
           "`retrain` stops at L-BFGS's gradient tolerance in float32; its own distance to w_exact is shown.\n",
           "| removed | ||w* - w_exact|| | grad at w_exact | retrain: dist / bound | "
           + " | ".join(f"{m}: dist | {m}: bound | {m}: bound / dist" for m in methods) + " |",
           "|---|---|---|---|" + "---|---|---|" * len(methods)]
    for r in rows:
        md.append(f"| {r['ratio']:.0%} | {r['original_dist_to_exact']:.3g} | {r['exact_grad_norm']:.1e} | "
                  f"{r['retrain_dist_to_exact']:.2g} / {f(r['retrain_cert'], '.2g')} | " + " | ".join(
                      f"{r[m]['dist_to_exact']:.3g} | {f(r[m]['certificate']['bound'], '.3g')} | "
                      + (f"{r[m]['certificate']['bound'] / r[m]['dist_to_exact']:.0f}" if r[m]['certificate']['bound'] else "n/a")
                      for m in methods) + " |")
    md += ["\n## Memory\n",
           "| params | param bytes | snapshot buffer | curvature stats | buffer + stats | DeltaGrad cache (2 T |w| float32, same T) | training data |",
           "|---|---|---|---|---|---|---|",
           f"| {mem['param_count']} | {mem['params_bytes']:,} | {mem['snapshot_buffer_bytes']:,} | {mem['curvature_stats_bytes']:,} | "
           f"{mem['snapshot_buffer_bytes'] + mem['curvature_stats_bytes']:,} | {mem['deltagrad_cache_bytes_same_steps']:,} "
           f"(T = {mem['train_steps']}) | {mem['training_data_bytes']:,} |", ""]
    text = "\n".join(md)
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
