"""Unlearning that reads only the removed examples (`mini-exact`) against `mini` and retraining.

    python benchmarks/removed_only.py --data fashion_mnist [--n 20000] [--ratios 0.1,0.3]
    python benchmarks/removed_only.py --data higgs --n 1000000 --r-base 1000000

writes OUT/STEM.{md,json} (OUT default benchmarks/results/removed_only, STEM default DATA_nN).

Side by side in one run, per removal ratio (uniform random R of `round(ratio * r_base)` rows,
`r_base` default n; give the same `--r-base` at two sizes to remove the same count): the
ground truth `retrain` (the recipe rerun on the remaining data, `mu.run_method`), the default
`mini`, and `mini-exact` (core/quadratic.py) with `model="exact-removed"` (the columns labelled
`mini-exact`) and with `model="quadratic"` (one exact Newton step from w*; the method's default
since these tables were made, labelled `mini-exact-quadratic`). Reported: each solve's time (compilation
apart, `compile_s`), the refresh that readies the next request (`mini`:
`methods.refresh_for_next_request`, a pass over the remaining data; `mini-exact`:
`quadratic.refresh`, the downdate of the stored model, which reads only the removed rows) and the
ratios to retraining with and without it; the training-time cost of `mini-exact`
(`fit_quadratic`: one pass over the training set and a factorisation, compilation measured apart
by compiling the same programs again); fidelity to retraining (relative parameter error and agreement from
`evaluation.compare.compare`, the KL ratio from float64 logits) and the norm of the remaining-data objective's
gradient at each answer (retraining's own is its stopping tolerance).

Data: `fashion_mnist` (Debian's local Fashion-MNIST, the first `--n` training images, the
project's default logistic regression, l2 = 1e-3, bias unpenalised) or `higgs` (the generator and
recipe of benchmarks/higgs_shaped.py: 28 features, 2 classes, l2 = 1e-3 on every parameter).
Absolute times on a shared machine are noisy; the ratios, measured in the same run, are the result.
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

from mini_unlearn_jax.app.recipes import build_problem
from mini_unlearn_jax.core import methods as M
from mini_unlearn_jax.core import quadratic as Q
from mini_unlearn_jax.core import registry as R
from mini_unlearn_jax.core.snapshots import nbytes
from mini_unlearn_jax.evaluation.compare import compare

T0 = time.perf_counter()
L2 = 1e-3
SOLVERS = {"mini": ("mini", {}), "mini-exact": ("mini-exact", {"model": "exact-removed"}),
           "mini-exact-quadratic": ("mini-exact", {"model": "quadratic"})}


def log(msg):
    print(f"[removed-only {time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def load(data: str, n: int | None, n_test: int | None, bias_free: bool):
    """(problem, dataset, training figures) for `fashion_mnist` or `higgs`."""
    if data == "fashion_mnist":
        spec = "fashion_mnist" + (f":n_train={n}" if n else "")
        if n_test:
            spec += ("," if n else ":") + f"n_test={n_test}"
        tr = build_problem(spec, "logreg", L2)
        return tr.problem, tr.dataset, {"train_s": tr.train_s, "train_compile_s": tr.train_compile_s,
                                        "train_steps": int(tr.state.step), "stats_s": tr.stats_s,
                                        "penalize_bias": False}
    if data == "higgs":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import higgs_shaped as hs

        ds = hs.higgs_like(n or 1_000_000, n_test or 100_000)
        problem, mem, train = hs.build(ds, penalize_bias=not bias_free)
        return problem, ds, {**train, "train_steps": mem["train_steps"], "penalize_bias": not bias_free}
    raise SystemExit(f"--data must be fashion_mnist or higgs, not {data!r}")


def fit_state(problem):
    """`fit_quadratic` timed end to end, with the compile time of its programs measured apart.

    The programs are compiled ahead of time first (timed); the call then compiles its own copy
    again (jit's call path does not reuse an ahead-of-time executable), so `fit_s` is the wall
    time less that measured compile time: an estimate of the pass and factorisation alone."""
    n = int(problem.x.shape[0])
    chunk = max(1, min(2048, n))  # fit_quadratic's default
    num_classes = int(problem.params["Dense_0"]["bias"].shape[0])
    w = Q.flatten(problem.params)
    d = int(w.size)
    xs, ys, ws = Q._pad(problem.x, problem.y, jnp.ones((n,), w.dtype), chunk)
    sq = jax.ShapeDtypeStruct((d, d), w.dtype)
    t0 = time.perf_counter()
    Q._sums.lower(problem.objective, num_classes, chunk, w, xs, ys, ws).compile()
    jax.jit(Q._factor).lower(sq, jax.ShapeDtypeStruct((d,), w.dtype), jax.ShapeDtypeStruct((), w.dtype)).compile()
    compile_s = time.perf_counter() - t0
    del xs, ys, ws
    t0 = time.perf_counter()
    state = jax.block_until_ready(Q.fit_quadratic(problem.objective, problem.params, problem.x, problem.y))
    wall = time.perf_counter() - t0
    return state, {"fit_wall_s": wall, "fit_compile_s": compile_s, "fit_s": max(wall - compile_s, 0.0),
                   "state_bytes": nbytes(state), "param_count": d}


def remaining_grad_norm(problem, params, forget) -> float:
    keep = jnp.asarray(M.keep_mask(int(problem.x.shape[0]), forget))
    g = jax.jit(jax.grad(lambda p: problem.objective.value(p, problem.x, problem.y, keep)))(params)
    return float(jnp.sqrt(sum(jnp.sum(a.astype(jnp.float64) ** 2) for a in jax.tree.leaves(g))))


def log_probs64(params, x, chunk: int = 100_000) -> np.ndarray:
    """Log class probabilities of a logistic regression in float64 (no float32 rounding in the KL:
    the models differ little, and float32 logits make KL(p_R || p_U) noise, even negative)."""
    k = np.asarray(params["Dense_0"]["kernel"], np.float64)
    b = np.asarray(params["Dense_0"]["bias"], np.float64)
    out = []
    for i in range(0, len(x), chunk):
        z = np.asarray(x[i:i + chunk], np.float64).reshape(min(chunk, len(x) - i), -1) @ k + b
        z -= z.max(1, keepdims=True)
        out.append(z - np.log(np.exp(z).sum(1, keepdims=True)))
    return np.concatenate(out)


def kl64(lp_ref: np.ndarray, lp: np.ndarray) -> float:
    return float(np.mean(np.sum(np.exp(lp_ref) * (lp_ref - lp), axis=1)))


def scalars(info: dict) -> dict:
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}


def cell(problem, ds, ratio: float, r_base: int, seed: int = 0) -> dict:
    n = int(problem.x.shape[0])
    r = max(1, int(round(ratio * r_base)))
    forget = np.sort(np.random.default_rng(seed).choice(n, r, replace=False))
    ret = R.run_method("retrain", problem, forget)
    row = {"ratio": ratio, "r": r, "removed_fraction": r / n, "retrain_s": ret.time_s,
           "retrain_compile_s": ret.compile_s, "retrain_info": scalars(ret.info),
           "retrain_grad_norm": remaining_grad_norm(problem, ret.params, forget)}
    lp_ref = log_probs64(ret.params, ds.x_test)
    row["original_kl64"] = kl64(lp_ref, log_probs64(problem.params, ds.x_test))
    log(f"ratio {ratio} (r = {r:,}): retrain {ret.time_s:.2f}s")
    for key, (name, opts) in SOLVERS.items():
        out = R.run_method(name, problem, forget, **opts)
        fig = compare(problem.objective, out.params, ret.params, problem.params, problem.x, problem.y, forget,
                      ds.x_test, ds.y_test)
        res = {"s": out.time_s, "compile_s": out.compile_s, "converged": out.converged, "reason": out.reason,
               "ratio": out.time_s / ret.time_s, "info": scalars(out.info),
               "grad_norm": remaining_grad_norm(problem, out.params, forget),
               **{k: fig[k] for k in ("kl_ratio", "kl_test", "original_kl_test", "rel_param_error", "param_error",
                                      "agreement_test", "test_acc", "retrain_test_acc", "forget_loss_ratio")}}
        res["kl64"] = kl64(lp_ref, log_probs64(out.params, ds.x_test))
        res["kl_ratio64"] = res["kl64"] / max(row["original_kl64"], 1e-300)
        if key == "mini":
            ref = M.refresh_for_next_request(problem, out.params, forget)
            res["refresh_s"], res["refresh_compile_s"] = ref.time_s, ref.compile_s
            del ref
        elif key == "mini-exact":
            ref = Q.refresh(problem, forget)
            res["refresh_s"], res["refresh_compile_s"] = ref.time_s, ref.compile_s
            res["refreshed_count"] = int(ref.state.count)
            del ref
            ref = Q.refresh(problem, forget, refactor=False)  # the removed rows' terms alone, no factorisation
            res["downdate_only_s"], res["downdate_only_compile_s"] = ref.time_s, ref.compile_s
            del ref
        else:  # the same downdate serves either model
            res["refresh_s"], res["refresh_compile_s"] = row["mini-exact"]["refresh_s"], 0.0
        res["ratio_with_refresh"] = (out.time_s + res["refresh_s"]) / ret.time_s
        row[key] = res
        log(f"  {key}: {out.time_s:.3f}s (compile {out.compile_s:.1f}s), refresh {res['refresh_s']:.3f}s, "
            f"ratio {res['ratio']:.4f} / {res['ratio_with_refresh']:.4f} with refresh, rel err "
            f"{res['rel_param_error']:.4f}, KL ratio {res['kl_ratio64']:.4g}, {out.reason}")
    return row


def write(results: dict, out: Path, stem: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=float))
    tr, fit = results["train"], results["fit"]
    keys = list(SOLVERS)
    md = [f"# Removed-only unlearning: {results['data']}, n = {results['n']:,}\n",
          f"Command: `{results['command']}`  ",
          f"Machine: {results['machine']}  ",
          f"Run time {results['wall_s'] / 60:.1f} min; peak resident memory {results['peak_rss_bytes'] / 2**30:.2f} GiB.\n",
          f"Logistic regression, d = {fit['param_count']:,} parameters, l2 = {results['l2']} "
          f"({'every parameter penalised' if tr['penalize_bias'] else 'bias unpenalised'}); trained by the default "
          f"L-BFGS recipe in {tr['train_s']:.1f} s ({tr['train_steps']} steps, compile {tr['train_compile_s']:.1f} s).\n",
          "## Training-time cost of mini-exact\n",
          "| fit_quadratic s (compile apart) | its compile s | wall s | state bytes | train s |", "|---|---|---|---|---|",
          f"| {fit['fit_s']:.2f} | {fit['fit_compile_s']:.2f} | {fit['fit_wall_s']:.2f} | {fit['state_bytes']:,} | {tr['train_s']:.2f} |\n",
          "## Time against retraining, side by side (compilation apart)\n",
          "`s` is the solve; `refresh` readies the next request (mini: a pass over the remaining data; mini-exact: "
          "the downdate of the stored model from the removed rows, shared by both of its models); `/ retrain` "
          "without and with the refresh.\n",
          "| removed | r | retrain s | " + " | ".join(f"{k} s | {k} refresh s | {k} / retrain | {k} + refresh / retrain"
                                                     for k in keys) + " |",
          "|---|---|---|" + "---|---|---|---|" * len(keys)]
    for r in results["rows"]:
        md.append(f"| {r['ratio']:.0%} | {r['r']:,} | {r['retrain_s']:.2f} | " + " | ".join(
            f"{r[k]['s']:.3f} | {r[k]['refresh_s']:.3f} | {r[k]['ratio']:.4f} | {r[k]['ratio_with_refresh']:.4f}"
            for k in keys) + " |")
    md += ["\nWhere mini-exact's refresh goes: the removed rows' loss, gradient and Hessian at w* (`refresh(..., "
           "refactor=False)`, timed alone) and the refactorisation (Cholesky and triangular inverse, the rest). "
           "Without the refactorisation the next request's solve keeps the previous factor as its preconditioner "
           "(the same answer; conjugate gradients may take more steps, not measured here).\n",
           "| removed | r | refresh s | removed terms s | refactorisation s | mini-exact + removed terms / retrain |",
           "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        e = r["mini-exact"]
        md.append(f"| {r['ratio']:.0%} | {r['r']:,} | {e['refresh_s']:.3f} | {e['downdate_only_s']:.3f} | "
                  f"{max(e['refresh_s'] - e['downdate_only_s'], 0.0):.3f} | "
                  f"{(e['s'] + e['downdate_only_s']) / r['retrain_s']:.4f} |")
    md += ["\nCompile seconds (solve / refresh): " + "; ".join(
        f"{r['ratio']:.0%}: " + ", ".join(f"{k} {r[k]['compile_s']:.1f} / {r[k]['refresh_compile_s']:.1f}" for k in keys)
        for r in results["rows"]) + ".\n",
           "## Fidelity to retraining\n",
           "rel err = ||w_U - w_R|| / ||w* - w_R|| and agreement from `evaluation.compare.compare`; KL ratio = mean test "
           "KL(p_R || p_U) / KL(p_R || p_orig) from float64 logits (compare's float32 figure is `kl_ratio` in the "
           "JSON); `grad` = ||grad F_R|| at the answer (retrain's is its own stopping point).\n",
           "| removed | retrain grad | " + " | ".join(f"{k} rel err | {k} KL ratio | {k} agreement | {k} grad | {k} status"
                                                   for k in keys) + " |",
           "|---|---|" + "---|---|---|---|---|" * len(keys)]
    for r in results["rows"]:
        md.append(f"| {r['ratio']:.0%} | {r['retrain_grad_norm']:.2e} | " + " | ".join(
            f"{r[k]['rel_param_error']:.4f} | {r[k]['kl_ratio64']:.4g} | {r[k]['agreement_test']:.4f} | "
            f"{r[k]['grad_norm']:.2e} | {r[k]['info'].get('status', r[k]['reason'])}"
            + (f" ({r[k]['info']['iterations']} it, {r[k]['info']['cg_products']} CG)" if 'cg_products' in r[k]['info'] else "")
            for k in keys) + " |")
    md.append("")
    text = "\n".join(md)
    (out / f"{stem}.md").write_text(text)
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="fashion_mnist", choices=("fashion_mnist", "higgs"))
    ap.add_argument("--n", type=int, default=None, help="training rows (fashion_mnist: the first N; higgs: 1,000,000)")
    ap.add_argument("--n-test", type=int, default=None, help="test rows (default: all 10,000 / higgs 100,000)")
    ap.add_argument("--ratios", default="0.01,0.1,0.3,0.5", help="removal ratios, comma-separated")
    ap.add_argument("--r-base", type=int, default=None, help="remove round(ratio * R_BASE) rows (default n)")
    ap.add_argument("--bias-free", action="store_true", help="higgs: the bias unpenalised (fashion_mnist always is)")
    ap.add_argument("--out", default="benchmarks/results/removed_only")
    ap.add_argument("--stem", default=None, help="output file name without suffix (default DATA_nN)")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    results = {"command": "python " + " ".join(sys.argv), "data": args.data, "l2": L2,
               "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "cpus": os.cpu_count(), "jax": jax.__version__, "device": str(jax.devices()[0])}}
    log(f"loading {args.data} and training")
    problem, ds, train = load(args.data, args.n, args.n_test, args.bias_free)
    n = int(problem.x.shape[0])
    results |= {"n": n, "n_test": int(len(ds.y_test)), "r_base": args.r_base or n, "train": train}
    log(f"trained: {train}")
    state, fit = fit_state(problem)
    problem.extras[Q.STATE_KEY] = state
    results["fit"] = fit
    log(f"fit_quadratic: {fit}")
    results["rows"] = []
    for ratio in ratios:
        results["rows"].append(cell(problem, ds, ratio, args.r_base or n))
    results["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results["wall_s"] = time.perf_counter() - T0
    print(write(results, Path(args.out), args.stem or f"{args.data}_n{n}"))


if __name__ == "__main__":
    main()
