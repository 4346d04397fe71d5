"""Time ratios of unlearning to retraining, measured side by side in one run.

    python benchmarks/time_ratio.py [--quick] [--out benchmarks/results]

writes OUT/time_ratio.{md,json} (OUT/time_ratio_quick.{md,json} with --quick).

Sweeps (Fashion-MNIST, multinomial logistic regression, l2=1e-3, unless --quick):
  * removed count r at fixed n (ratios 1, 5, 10, 30, 50 %),
  * training-set size n at a fixed 10 % ratio,
  * parameter count: logistic regression and MLPs of several widths (10 % removal),
and reports, per cell, unlearning time / retraining time for `mini` and `mini-lite` (compilation
timed apart), with the memory of the snapshot buffer, the curvature statistics, DeltaGrad's
cache for the same number of steps, and the parameters. Absolute times on shared machines are
noisy; the ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from mini_unlearn_jax.app.recipes import build_problem
from mini_unlearn_jax.core import registry as R
from mini_unlearn_jax.core.snapshots import nbytes


def log(msg):
    print(f"[bench {time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def build(spec: str, model_name: str, l2: float, hidden: int = 256):
    """The CLI's default recipe for ``model_name`` on ``spec`` (seed 0), with its memory footprint."""
    tr = build_problem(spec, model_name, l2, hidden=hidden)
    ds, problem, st = tr.dataset, tr.problem, tr.state
    stats = problem.stats
    steps = int(st.step)
    dim = sum(a.size for a in jax.tree.leaves(st.params))
    mem = {"params_bytes": nbytes(st.params), "snapshot_buffer_bytes": nbytes(st.snapshots),
           "curvature_stats_bytes": nbytes(stats) if stats is not None else 0,
           "deltagrad_cache_bytes_same_steps": 2 * steps * dim * 4, "train_steps": steps, "param_count": int(dim)}
    return ds, problem, mem


def cell(problem, n, ratio, methods, seed=0):
    forget = np.sort(np.random.default_rng(seed).choice(n, max(1, int(round(ratio * n))), replace=False))
    ret = R.run_method("retrain", problem, forget)
    row = {"n": n, "r": int(forget.size), "ratio": ratio, "retrain_s": ret.time_s, "retrain_compile_s": ret.compile_s}
    for m in methods:
        out = R.run_method(m, problem, forget)
        row[f"{m}_s"] = out.time_s
        row[f"{m}_compile_s"] = out.compile_s
        row[f"{m}_ratio"] = out.time_s / ret.time_s
        row[f"{m}_converged"] = out.converged
    return row


def table(rows, key, methods):
    head = f"| {key} | r | retrain s | " + " | ".join(f"{m} s | {m} / retrain" for m in methods) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(methods))]
    for r in rows:
        lines.append(f"| {r[key]} | {r['r']} | {r['retrain_s']:.2f} | "
                     + " | ".join(f"{r[m + '_s']:.3f} | {r[m + '_ratio']:.4f}" for m in methods) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run, minutes)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    methods = ["mini", "mini-lite"]
    base = "fashion_mnist" if not args.quick else "fashion_mnist:n_train=6000,n_test=1000"
    n_full = 60000 if not args.quick else 6000
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpus": __import__("os").cpu_count(), "jax": jax.__version__,
                           "device": str(jax.devices()[0])}, "command": " ".join(sys.argv)}

    log(f"training logreg on {base}")
    ds, problem, mem = build(base, "logreg", 1e-3)
    results["memory_logreg"] = mem
    results["vs_r"] = []
    for ratio in (0.01, 0.05, 0.1, 0.3, 0.5):
        results["vs_r"].append(cell(problem, n_full, ratio, methods))
        log(f"vs r: {results['vs_r'][-1]}")

    results["vs_n"] = []
    for frac in (0.125, 0.25, 0.5, 1.0):
        n = int(n_full * frac)
        spec = f"fashion_mnist:n_train={n}" + (",n_test=1000" if args.quick else "")
        _, prob_n, _ = build(spec, "logreg", 1e-3)
        results["vs_n"].append(cell(prob_n, n, 0.1, methods))
        log(f"vs n: {results['vs_n'][-1]}")

    results["vs_params"] = []
    n_mlp = 10000 if not args.quick else 3000
    spec = f"fashion_mnist:n_train={n_mlp},n_test=1000"
    _, prob_lr, mem_lr = build(spec, "logreg", 1e-3)
    row = cell(prob_lr, n_mlp, 0.1, methods)
    row.update(model="logreg", **mem_lr)
    results["vs_params"].append(row)
    for width in (64, 256, 1024):
        _, prob_mlp, mem_mlp = build(spec, "mlp", 1e-4, hidden=width)
        row = cell(prob_mlp, n_mlp, 0.1, methods)
        row.update(model=f"mlp-{width}", **mem_mlp)
        results["vs_params"].append(row)
        log(f"vs params: {row}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "time_ratio_quick" if args.quick else "time_ratio"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=float))
    mem_lines = ["| model | params | param bytes | snapshot buffer | curvature stats | DeltaGrad cache (same steps) | mini / retrain |",
                 "|---|---|---|---|---|---|---|"]
    for r in results["vs_params"]:
        mem_lines.append(f"| {r['model']} | {r['param_count']} | {r['params_bytes']} | {r['snapshot_buffer_bytes']} | "
                         f"{r['curvature_stats_bytes']} | {r['deltagrad_cache_bytes_same_steps']} | {r['mini_ratio']:.4f} |")
    md = [f"# Unlearning / retraining time ratios\n\nCommand: `python {' '.join(sys.argv)}`  \nMachine: "
          f"{results['machine']}\n",
          "## Against the removed count r (n fixed, logreg)\n", table(results["vs_r"], "ratio", methods),
          "\n## Against n (10 % removed, logreg)\n", table(results["vs_n"], "n", methods),
          "\n## Against the parameter count (10 % removed)\n", table(results["vs_params"], "model", methods),
          "\n## Memory\n", "\n".join(mem_lines), ""]
    (out / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))


T0 = time.perf_counter()
if __name__ == "__main__":
    main()
