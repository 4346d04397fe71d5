"""Evidence table: Mini-Unlearning vs baselines at high unlearning ratios (method.md §5).

For each model (multinomial logistic regression on all of Fashion-MNIST; a 2-layer MLP on a
subset), each unlearning ratio and each method, removes a uniform random forget set and compares
the unlearned model with the model retrained on the remaining data, measured in the same run::

    python experiments/fidelity.py                                   # everything (long)
    python experiments/fidelity.py --models logreg                   # logreg, all ratios/methods
    python experiments/fidelity.py --models mlp --ratios 10,30,50    # adds/replaces MLP cells

Outputs (``--out``, default ``experiments/results/fidelity/``): ``results.csv``,
``results.json`` (one row per cell plus the configuration of every run), ``table.md`` and
``fidelity_vs_time.png``. Rows of earlier runs in ``--out`` are kept unless the same cell
(model, method, ratio, seed, n_train) is rerun, or ``--fresh`` is given; outputs are rewritten
after every cell, so an interrupted run leaves its finished cells.

Protocol notes:
- The forget set of ratio ``rho`` is ``sort(default_rng(seed).choice(n, round(rho * n)))``, the
  same draw as ``mini-unlearn unlearn --ratio rho --seed seed``.
- Every method is compared with ``retrain`` (the training recipe on the remaining data) of the same
  cell, except DeltaGrad, which replays its own (S)GD trajectory: it is compared with
  ``deltagrad_retrain`` (the same (S)GD recipe on the remaining data), its "original" model is
  ``info['own_original']`` and its time ratio is replay time / that retrain's time.
- ``kl_ratio`` = KL(p_R || p_U) / KL(p_R || p_original) on the test set; ``rel_param_error`` =
  ||w_U - w_R|| / ||w_original - w_R||. Times exclude compilation (reported apart).
- ``memory_bytes`` is the history the method keeps from training: the snapshot buffer plus the
  curvature statistics for the mini variants, the per-step cache for DeltaGrad, 0 for the others
  (which need only the parameters, ``param_bytes``, and the data).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ALL_METHODS = ("mini", "mini-lite", "mini-plus", "newton", "finetune", "neggrad", "deltagrad")
ALL_RATIOS = (1, 5, 10, 20, 30, 50)
ALL_MODELS = ("logreg", "mlp")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "fidelity"
# Targets for the default ``mini`` at ratios 10/30/50% (the acceptance criteria).
TARGET_RATIOS = (10, 30, 50)
TARGETS = {"kl_ratio": 0.1, "rel_param_error": 0.5, "time_ratio": 0.05}

T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[fidelity {time.perf_counter() - T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_list(text: str, allowed, kind: str, conv=str) -> list:
    items = [conv(t.strip()) for t in text.split(",") if t.strip()]
    if not items:
        raise SystemExit(f"--{kind}: give a comma-separated list")
    bad = [t for t in items if allowed is not None and t not in allowed]
    if bad:
        raise SystemExit(f"--{kind}: unknown {bad}; choose from {', '.join(map(str, allowed))}")
    return items


def _value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_method(spec: str) -> tuple[str, str, dict]:
    """``NAME`` or ``NAME:KEY=VALUE[+KEY=VALUE...]`` -> (label, name, options)."""
    name, _, rest = spec.partition(":")
    if name not in ALL_METHODS + ("retrain",):
        raise SystemExit(f"--methods: unknown method {name!r}; choose from {', '.join(ALL_METHODS)}")
    opts = {}
    for item in filter(None, rest.split("+")):
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise SystemExit(f"--methods: bad option {item!r} in {spec!r}; write KEY=VALUE")
        opts[k] = _value(v)
    return spec, name, opts


def base_method(label: str) -> str:
    return label.partition(":")[0]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(ALL_MODELS), help="comma list of logreg,mlp")
    p.add_argument("--ratios", default=",".join(map(str, ALL_RATIOS)),
                   help="comma list of unlearning ratios in percent (0 < r < 100)")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"comma list of {','.join(ALL_METHODS)} (retrain runs as the reference); a method may "
                        "carry options for run_method as NAME:KEY=VALUE[+KEY=VALUE...], e.g. deltagrad:lr=0.1, "
                        "reported under that label")
    p.add_argument("--seed", type=int, default=0, help="seeds the init, the batch order and the forget sets")
    p.add_argument("--data", default="fashion_mnist", help="dataset name for load_dataset")
    p.add_argument("--logreg-n-train", type=int, default=None, help="logreg training examples (default: all)")
    p.add_argument("--logreg-l2", type=float, default=1e-3)
    p.add_argument("--mlp-n-train", type=int, default=10000, help="MLP training examples (first N)")
    p.add_argument("--mlp-l2", type=float, default=1e-4)
    p.add_argument("--hidden", type=int, default=256, help="MLP hidden width")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--fresh", action="store_true", help="discard rows of earlier runs in --out")
    args = p.parse_args(argv)
    args.models = parse_list(args.models, ALL_MODELS, "models")
    args.methods = [m for m in (parse_method(t) for t in parse_list(args.methods, None, "methods"))
                    if m[1] != "retrain"]
    args.ratios = parse_list(args.ratios, None, "ratios", float)
    for r in args.ratios:
        if not 0 < r < 100:
            raise SystemExit(f"--ratios: {r} is not strictly between 0 and 100 (percent)")
    return args


def machine_info() -> dict:
    import jax
    import jaxlib

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, ValueError, subprocess.CalledProcessError):
        nproc = len(os.sched_getaffinity(0))
    mem = ""
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1])
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return {"nproc": nproc, "cpu": cpu, "memory": mem, "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "device": ", ".join(str(d) for d in jax.devices()), "backend": jax.default_backend()}


def library_version() -> dict:
    """Git commit of the checkout, whether the library has uncommitted changes, and a hash of its sources."""
    import hashlib

    import mini_unlearn_jax

    pkg = Path(mini_unlearn_jax.__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        h.update(f.relative_to(pkg).as_posix().encode())
        h.update(f.read_bytes())
    info = {"library_sha256": h.hexdigest()[:16]}
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=pkg.parent, capture_output=True, text=True,
                                        check=True).stdout.strip()
        info["git_commit"] = git("rev-parse", "--short", "HEAD")
        info["library_dirty"] = bool(git("status", "--porcelain", "--", pkg.name))
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


# -- models ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Trained:
    name: str
    problem: object  # methods.Problem
    ds: object  # data.Dataset (the training subset used)
    config: dict


def train_model(name: str, args) -> Trained:
    """Train ``name`` once (L-BFGS/Adam recipe of ``default_config``) and fit its curvature stats."""
    import jax
    import jax.numpy as jnp

    from mini_unlearn_jax.app.data import load_dataset
    from mini_unlearn_jax.core import linalg as cv
    from mini_unlearn_jax.core import methods as M
    from mini_unlearn_jax.core.models import build_model, init_params, make_objective
    from mini_unlearn_jax.core.snapshots import nbytes
    from mini_unlearn_jax.core.training import Trainer, default_config
    from mini_unlearn_jax.evaluation.metrics import accuracy, predict_probs

    if name == "logreg":
        spec = args.data if args.logreg_n_train is None else f"{args.data}:n_train={args.logreg_n_train}"
        l2, hidden = args.logreg_l2, None
    else:
        spec = f"{args.data}:n_train={args.mlp_n_train}"
        l2, hidden = args.mlp_l2, args.hidden
    ds = load_dataset(spec)
    model = build_model(name, ds.num_classes, **({"hidden": hidden} if hidden else {}))
    objective = make_objective(model, l2)
    cfg = default_config(name, ds.n_train, seed=args.seed)
    params0 = init_params(model, ds.x_train[0], args.seed)
    log(f"{name}: training on {spec} (n={ds.n_train}, l2={l2}, {cfg.optimizer}, up to {cfg.steps} steps)")
    trainer = Trainer(objective, cfg)
    t0 = time.perf_counter()
    state = trainer.fit(params0, ds.x_train, ds.y_train, verbose=False, label=f"train {name}")
    jax.block_until_ready(state.params)
    train_s = time.perf_counter() - t0 - trainer.compile_s
    t0 = time.perf_counter()
    stats = cv.fit_stats(objective, state.params, ds.x_train)
    stats_s = time.perf_counter() - t0
    p_train = predict_probs(objective, state.params, ds.x_train)
    p_test = predict_probs(objective, state.params, ds.x_test)
    problem = M.Problem(objective, cfg, params0, state.params, state.snapshots, stats,
                        jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
    config = {
        "model": name, "data_spec": spec, "n_train": ds.n_train, "n_test": int(ds.x_test.shape[0]),
        "l2": l2, "hidden": hidden, "seed": args.seed,
        "train_config": dataclasses.asdict(cfg),
        "train_s": train_s, "train_compile_s": trainer.compile_s, "stats_s": stats_s,
        "steps_run": int(state.step), "final_grad_norm": float(state.grad_norm),
        "train_acc": accuracy(p_train, ds.y_train), "test_acc": accuracy(p_test, ds.y_test),
        "param_count": int(sum(a.size for a in jax.tree.leaves(state.params))),
        "param_bytes": nbytes(state.params), "snapshot_bytes": nbytes(state.snapshots),
        "stats_bytes": nbytes(stats) if stats is not None else 0,
        "mini_configs": {k: dataclasses.asdict(v) for k, v in M.MINI_VARIANTS.items()},
    }
    log(f"{name}: trained in {train_s:.1f}s (+{trainer.compile_s:.1f}s compile, {config['steps_run']} steps, "
        f"grad norm {config['final_grad_norm']:.2e}), train acc {config['train_acc']:.4f}, "
        f"test acc {config['test_acc']:.4f}; stats {stats_s:.1f}s")
    return Trained(name, problem, ds, config)


# -- one cell ---------------------------------------------------------------------------------


def forget_set(n: int, ratio_pct: float, seed: int) -> np.ndarray:
    r = int(round(ratio_pct / 100.0 * n))
    if not 1 <= r < n:
        raise SystemExit(f"ratio {ratio_pct}% of {n} examples removes {r}: out of range")
    return np.sort(np.random.default_rng(seed).choice(n, size=r, replace=False)).astype(np.int32)


class Reference:
    """A reference (retrained) model of a cell and the original model it is compared with."""

    def __init__(self, tm: Trained, retrained, original, time_s: float, compile_s: float, name: str):
        from mini_unlearn_jax.evaluation import metrics as mt

        obj = tm.problem.objective
        self.name, self.params, self.original = name, retrained, original
        self.time_s, self.compile_s = time_s, compile_s
        self.p_test = mt.predict_probs(obj, retrained, tm.ds.x_test)
        self.p_orig_test = mt.predict_probs(obj, original, tm.ds.x_test)
        self.original_kl = mt.mean_kl(self.p_test, self.p_orig_test)
        self.test_acc = mt.accuracy(self.p_test, tm.ds.y_test)
        self.original_test_acc = mt.accuracy(self.p_orig_test, tm.ds.y_test)


def jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if k == "own_original":
            continue
        if isinstance(v, dict):
            out[k] = jsonable(v)
        elif isinstance(v, (np.generic,)):
            out[k] = v.item()
        elif isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
        else:
            out[k] = str(v)
    return out


def evaluate(tm: Trained, method: str, res, ref: Reference, forget: np.ndarray, ratio: float,
             memory_bytes: int) -> dict:
    from mini_unlearn_jax.evaluation import metrics as mt

    obj, ds = tm.problem.objective, tm.ds
    x, y = tm.problem.x, np.asarray(tm.problem.y)
    keep = np.ones(x.shape[0], bool)
    keep[forget] = False
    p_test = mt.predict_probs(obj, res.params, ds.x_test)
    p_forget = mt.predict_probs(obj, res.params, x[forget])
    p_retain = mt.predict_probs(obj, res.params, x[np.flatnonzero(keep)])
    p_ref_forget = mt.predict_probs(obj, ref.params, x[forget])
    kl = mt.mean_kl(ref.p_test, p_test)
    rel = mt.rel_param_error(res.params, ref.params, ref.original) if method != "retrain" else 0.0
    return {
        "model": tm.name, "method": method, "ratio_pct": ratio, "seed": tm.config["seed"],
        "n_train": tm.config["n_train"], "n_removed": int(forget.size),
        "reference": ref.name,
        "test_acc": mt.accuracy(p_test, ds.y_test),
        "forget_acc": mt.accuracy(p_forget, y[forget]),
        "retain_acc": mt.accuracy(p_retain, y[keep]),
        "rel_param_error": rel,
        "kl_test": kl,
        "kl_forget": mt.mean_kl(p_ref_forget, p_forget),
        "original_kl_test": ref.original_kl,
        "kl_ratio": kl / ref.original_kl if ref.original_kl > 0 else float("nan"),
        "agreement": mt.agreement(ref.p_test, p_test),
        "time_s": float(res.time_s), "compile_s": float(res.compile_s),
        "retrain_time_s": ref.time_s,
        "time_ratio": float(res.time_s) / max(ref.time_s, 1e-12),
        "memory_bytes": int(memory_bytes), "param_bytes": tm.config["param_bytes"],
        "converged": bool(res.converged), "reason": res.reason,
        "retrain_test_acc": ref.test_acc, "original_test_acc": ref.original_test_acc,
        "info": jsonable(dict(res.info)),
    }


def run_cell(tm: Trained, ratio: float, methods: list, seed: int, emit) -> None:
    from mini_unlearn_jax.core import methods as M
    from mini_unlearn_jax.core.snapshots import nbytes

    problem = tm.problem
    n = int(problem.x.shape[0])
    forget = forget_set(n, ratio, seed)
    tag = f"{tm.name} {ratio:g}%"
    ref = None
    if any(name != "deltagrad" for _, name, _ in methods):  # DeltaGrad has its own reference
        log(f"{tag}: removing {forget.size} of {n}; retraining (reference) ...")
        ret = M.run_method("retrain", problem, forget)
        ref = Reference(tm, ret.params, problem.params, ret.time_s, ret.compile_s, "retrain")
        log(f"{tag}: retrain {ret.time_s:.2f}s (+{ret.compile_s:.1f}s compile), test acc {ref.test_acc:.4f}, "
            f"original KL to it {ref.original_kl:.3e}")
        emit(evaluate(tm, "retrain", ret, ref, forget, ratio, 0))
    else:
        log(f"{tag}: removing {forget.size} of {n} (DeltaGrad only: no retrain of the training recipe)")
    mini_mem = nbytes(problem.snapshots) + (nbytes(problem.stats) if problem.stats is not None else 0)
    for method, name, opts in methods:
        t0 = time.perf_counter()
        try:
            res = M.run_method(name, problem, forget, **opts)
        except Exception as e:  # report, keep going with the other cells
            log(f"{tag}: {method} FAILED: {type(e).__name__}: {e}")
            emit({"model": tm.name, "method": method, "ratio_pct": ratio, "seed": seed, "n_train": n,
                  "n_removed": int(forget.size), "converged": False, "reason": f"error: {type(e).__name__}: {e}"})
            continue
        if name == "deltagrad":
            dref_out = M.deltagrad_retrain(problem, forget, **opts)
            dref = Reference(tm, dref_out.params, res.info["own_original"], dref_out.time_s,
                             dref_out.compile_s, "deltagrad_retrain")
            row = evaluate(tm, method, res, dref, forget, ratio, res.info["cache_bytes"])
            row["info"]["own_retrain_test_acc"] = dref.test_acc
            row["info"]["own_original_test_acc"] = dref.original_test_acc
        else:
            mem = mini_mem if name.startswith("mini") else 0
            row = evaluate(tm, method, res, ref, forget, ratio, mem)
        row["options"] = json.dumps(opts) if opts else ""
        emit(row)
        log(f"{tag}: {method:9s} {res.time_s:8.3f}s (+{res.compile_s:5.1f}s compile) "
            f"time ratio {row['time_ratio']:.4f}  kl ratio {row['kl_ratio']:.3e}  rel err {row['rel_param_error']:.3f}  "
            f"test acc {row['test_acc']:.4f}  {res.reason}  [{time.perf_counter() - t0:.1f}s wall]")


# -- outputs ----------------------------------------------------------------------------------

CSV_COLUMNS = ["model", "method", "options", "ratio_pct", "seed", "n_train", "n_removed", "reference", "test_acc",
               "forget_acc", "retain_acc", "rel_param_error", "kl_test", "kl_forget", "original_kl_test",
               "kl_ratio", "agreement", "time_s", "compile_s", "retrain_time_s", "time_ratio", "memory_bytes",
               "param_bytes", "converged", "reason", "retrain_test_acc", "original_test_acc"]
METHOD_ORDER = ("retrain",) + ALL_METHODS


def row_key(r: dict) -> tuple:
    return (r["model"], r["method"], float(r["ratio_pct"]), r["seed"], r["n_train"])


def sort_rows(rows: list) -> list:
    mo = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(rows, key=lambda r: (ALL_MODELS.index(r["model"]) if r["model"] in ALL_MODELS else 9,
                                       r["n_train"], r["seed"], float(r["ratio_pct"]),
                                       mo.get(base_method(r["method"]), 99), r["method"]))


def method_labels(rows: list) -> list:
    """Distinct method labels, in METHOD_ORDER (variants such as ``deltagrad:lr=0.1`` after their base)."""
    mo = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted({r["method"] for r in rows}, key=lambda m: (mo.get(base_method(m), 99), m))


def fmt(v, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if kind == "acc":
        return f"{v:.4f}"
    if kind == "sci":
        return f"{v:.2e}"
    if kind == "rel":
        return f"{v:.3f}"
    if kind == "time":
        return f"{v:.3f}" if v < 100 else f"{v:.1f}"
    if kind == "bytes":
        if v == 0:
            return "0"
        for unit, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if v >= s:
                return f"{v / s:.2f} {unit}"
        return f"{v} B"
    return str(v)


def pct(r) -> str:
    return f"{float(r):g}%"


def pivot(rows: list, key: str, kind: str, title: str) -> list[str]:
    ratios = sorted({float(r["ratio_pct"]) for r in rows})
    methods = method_labels(rows)
    cell = {(r["method"], float(r["ratio_pct"])): r for r in rows}
    lines = [f"**{title}**", "", "| method | " + " | ".join(pct(x) for x in ratios) + " |",
             "|---|" + "---:|" * len(ratios)]
    for m in methods:
        vals = []
        for x in ratios:
            r = cell.get((m, x))
            if r is None:
                vals.append("")
                continue
            s = fmt(r.get(key), kind)
            if not r.get("converged", True):
                s += " ✗"
            vals.append(s)
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return lines + [""]


def check_targets(rows: list) -> list[str]:
    cell = {(r["method"], float(r["ratio_pct"])): r for r in rows}
    out = []
    for ratio in TARGET_RATIOS:
        r = cell.get(("mini", float(ratio)))
        if r is None or "kl_ratio" not in r:
            continue
        checks = [f"kl ratio {r['kl_ratio']:.3g} {'≤' if r['kl_ratio'] <= TARGETS['kl_ratio'] else '>'} "
                  f"{TARGETS['kl_ratio']}",
                  f"rel err {r['rel_param_error']:.3g} {'≤' if r['rel_param_error'] <= TARGETS['rel_param_error'] else '>'} "
                  f"{TARGETS['rel_param_error']}",
                  f"time ratio {r['time_ratio']:.3g} {'≤' if r['time_ratio'] <= TARGETS['time_ratio'] else '>'} "
                  f"{TARGETS['time_ratio']}"]
        ok = (r["kl_ratio"] <= TARGETS["kl_ratio"] and r["rel_param_error"] <= TARGETS["rel_param_error"]
              and r["time_ratio"] <= TARGETS["time_ratio"] and r["converged"])
        for d in rows:
            if base_method(d["method"]) != "deltagrad" or float(d["ratio_pct"]) != float(ratio):
                continue
            better = r["kl_test"] < d["kl_test"]
            ok = ok and better
            checks.append(f"kl_test {r['kl_test']:.3g} {'<' if better else '≥'} {d['method']}'s {d['kl_test']:.3g}")
        out.append(f"- {ratio}%: **{'PASS' if ok else 'FAIL'}** — " + "; ".join(checks)
                   + ("" if r["converged"] else f"; not converged ({r['reason']})"))
    return out


def write_table(path: Path, rows: list, runs: list, models: dict) -> None:
    lines = ["# Mini-Unlearning vs baselines at high unlearning ratios", "",
             "Generated by `experiments/fidelity.py`; rows in `results.csv` / `results.json`. "
             "Uniform random forget sets; every metric is against the model retrained on the remaining data "
             "in the same run (same recipe, init and seed).", ""]
    by_model: dict = {}
    for r in rows:
        by_model.setdefault((r["model"], r["n_train"], r["seed"]), []).append(r)
    for (model, n_train, seed), mrows in by_model.items():
        cfg = models.get(f"{model}:{n_train}:{seed}", {})
        tc = cfg.get("train_config", {})
        lines += [f"## {model} — {cfg.get('data_spec', '?')} (n_train={n_train}, seed={seed})", ""]
        if cfg:
            lines += [f"l2={cfg['l2']}" + (f", hidden={cfg['hidden']}" if cfg.get("hidden") else "")
                      + f", {tc.get('optimizer')} "
                      + ("full batch" if tc.get("batch_size") is None else f"batch {tc.get('batch_size')}")
                      + f", {cfg['steps_run']} steps (final grad norm {cfg['final_grad_norm']:.2e}); "
                      f"trained in {cfg['train_s']:.1f}s; original train acc {cfg['train_acc']:.4f}, "
                      f"test acc {cfg['test_acc']:.4f}; {cfg['param_count']} parameters "
                      f"({fmt(cfg['param_bytes'], 'bytes')}); snapshot buffer {fmt(cfg['snapshot_bytes'], 'bytes')}"
                      f" (K={tc.get('snapshots')}), curvature stats {fmt(cfg['stats_bytes'], 'bytes')}.", ""]
        ok_rows = [r for r in mrows if "kl_ratio" in r]
        lines += pivot(ok_rows, "kl_ratio", "sci",
                       "KL ratio: KL(p_R‖p_U) / KL(p_R‖p_original) on test (lower is better; 1 = did nothing)")
        lines += pivot(ok_rows, "rel_param_error", "rel", "Relative parameter error ‖w_U−w_R‖ / ‖w*−w_R‖")
        lines += pivot(ok_rows, "time_ratio", "sci", "Time ratio: time_s / retrain time_s of the same cell")
        lines += pivot(ok_rows, "test_acc", "acc", "Test accuracy")
        lines += pivot(ok_rows, "forget_acc", "acc", "Forget-set accuracy")
        lines += pivot(ok_rows, "agreement", "acc", "Test prediction agreement with the retrained model")
        lines += ["**All cells**", "",
                  "| ratio | method | test acc | forget acc | rel err | kl_test | kl ratio | agree | time s | "
                  "compile s | time ratio | memory | converged |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in mrows:
            if "kl_ratio" not in r:
                lines.append(f"| {pct(r['ratio_pct'])} | {r['method']} | | | | | | | | | | | ✗ {r['reason']} |")
                continue
            conv = "yes" if r["converged"] else f"✗ {r['reason']}"
            lines.append(
                f"| {pct(r['ratio_pct'])} | {r['method']} | {fmt(r['test_acc'], 'acc')} | {fmt(r['forget_acc'], 'acc')} | "
                f"{fmt(r['rel_param_error'], 'rel')} | {fmt(r['kl_test'], 'sci')} | {fmt(r['kl_ratio'], 'sci')} | "
                f"{fmt(r['agreement'], 'acc')} | {fmt(r['time_s'], 'time')} | {fmt(r['compile_s'], 'time')} | "
                f"{fmt(r['time_ratio'], 'sci')} | {fmt(r['memory_bytes'], 'bytes')} | {conv} |")
        lines.append("")
        for label in method_labels([r for r in ok_rows if base_method(r["method"]) == "deltagrad"]):
            dg = [r for r in ok_rows if r["method"] == label]
            dcfg = dg[0]["info"].get("config", {})
            lines += [f"`{label}` rows follow DeltaGrad's own protocol: it replays its own (S)GD trajectory "
                      f"({json.dumps(dcfg)}), so its reference is `deltagrad_retrain` (that recipe on the remaining "
                      "data), its original model is `info['own_original']` (that recipe on all data), and its "
                      "time ratio is replay time / that retrain's time. Its own original/retrained test accuracy: "
                      + ", ".join(f"{pct(r['ratio_pct'])}: {r['original_test_acc']:.4f}/{r['retrain_test_acc']:.4f}"
                                  for r in dg) + ".", ""]
        targets = check_targets(ok_rows)
        if targets:
            lines += [f"**Targets for `mini` at {'/'.join(map(str, TARGET_RATIOS))}%** (kl ratio ≤ "
                      f"{TARGETS['kl_ratio']}, rel err ≤ {TARGETS['rel_param_error']}, time ratio ≤ "
                      f"{TARGETS['time_ratio']}, kl_test below DeltaGrad's):", ""] + targets + [""]
        bad = [r for r in mrows if not r.get("converged", True)]
        if bad:
            lines += ["**Not converged / failed:** " + "; ".join(
                f"{r['method']} at {pct(r['ratio_pct'])} ({r['reason']})" for r in bad), ""]
    lines += ["## Notes", "",
              "- Memory: snapshot buffer + curvature statistics for the mini variants (`nbytes(problem.snapshots)` "
              "+ `nbytes(stats)`), the per-step training cache for DeltaGrad (`info['cache_bytes']`), 0 for the "
              "others (they keep no training history; they need the parameters and the data).",
              "- Times exclude compilation (`compile_s`, compiled ahead of time); `retrain` is the training recipe "
              "on the remaining data. ✗ marks a method that reported non-convergence.",
              "- Forget set of ratio ρ: `sort(np.random.default_rng(seed).choice(n, round(ρ n), replace=False))`, "
              "as `mini-unlearn unlearn --ratio ρ --seed seed`.", "",
              "## Runs", ""]
    for run in runs:
        mi = run["machine"]
        lib = run.get("library", {})
        libtxt = (f"library {lib.get('git_commit', '?')}{' + uncommitted changes' if lib.get('library_dirty') else ''}"
                  f" (sources sha256 {lib.get('library_sha256', '?')}"
                  + (", changed during the run" if "library_at_end" in run else "") + ")")
        lines += [f"- `{run['command']}` — started {run['started']}, wall {run.get('wall_s', float('nan')):.0f}s, {libtxt}"
                  f"{'' if run.get('finished') else ' (unfinished)'}; models {','.join(run['models'])}, ratios "
                  f"{','.join(f'{x:g}' for x in run['ratios'])}; machine: nproc={mi['nproc']}, {mi['cpu']}, "
                  f"{mi['memory']}, jax {mi['jax']} (jaxlib {mi['jaxlib']}), device {mi['device']}, "
                  f"{mi['platform']}, Python {mi['python']}"]
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, rows: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in rows if "kl_ratio" in r and r["method"] != "retrain"]
    models = []
    for r in rows:
        k = (r["model"], r["n_train"])
        if k not in models:
            models.append(k)
    if not models:
        return
    markers = {"mini": "o", "mini-lite": "v", "mini-plus": "^", "newton": "s", "finetune": "D",
               "neggrad": "X", "deltagrad": "P"}
    extra = iter(["*", "h", "p", "<", ">", "d", "8", "H"] * 4)
    for label in method_labels(rows):
        if label not in markers:
            markers[label] = next(extra)
    ratios = sorted({float(r["ratio_pct"]) for r in rows})
    cmap = plt.get_cmap("viridis")
    color = {x: cmap(i / max(1, len(ratios) - 1)) for i, x in enumerate(ratios)}
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5.2), squeeze=False)
    floor = 1e-8
    for ax, (model, n_train) in zip(axes[0], models, strict=True):
        for r in rows:
            if (r["model"], r["n_train"]) != (model, n_train):
                continue
            x = max(r["time_ratio"], floor)
            y = max(r["kl_ratio"], floor) if np.isfinite(r["kl_ratio"]) else np.nan
            ax.scatter(x, y, marker=markers[r["method"]], color=color[float(r["ratio_pct"])], s=60,
                       edgecolors="k" if r["converged"] else "r", linewidths=0.6 if r["converged"] else 1.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.axhline(TARGETS["kl_ratio"], color="tab:red", lw=0.6, ls=":")
        ax.axvline(TARGETS["time_ratio"], color="tab:red", lw=0.6, ls=":")
        ax.set_xlabel("time_s / retrain time_s (same cell)")
        ax.set_ylabel("test KL(p_R‖p_U) / KL(p_R‖p_original)")
        ax.set_title(f"{model} (Fashion-MNIST, n={n_train})")
        ax.grid(True, which="both", alpha=0.25)
    handles = [Line2D([], [], marker=markers[m], ls="", color="grey", markeredgecolor="k", label=m)
               for m in method_labels(rows)]
    handles += [Line2D([], [], marker="o", ls="", color=color[x], label=f"{x:g}%") for x in ratios]
    handles += [Line2D([], [], marker="o", ls="", color="w", markeredgecolor="r", markeredgewidth=1.8,
                       label="not converged")]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle("Fidelity vs cost (DeltaGrad against its own (S)GD retrain); red dotted: mini targets")
    fig.tight_layout(rect=(0, 0, 0.88, 0.95))
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, path)


def write_outputs(out: Path, rows: list, runs: list, models: dict) -> None:
    rows = sort_rows(rows)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.partial"
    tmp.write_text(json.dumps({"runs": runs, "models": models, "rows": rows}, indent=1, default=float))
    os.replace(tmp, out / "results.json")
    tmp = out / "results.csv.partial"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    os.replace(tmp, out / "results.csv")
    write_table(out / "table.md", rows, runs, models)
    write_plot(out / "fidelity_vs_time.png", rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    rows: list = []
    runs: list = []
    models: dict = {}
    if not args.fresh and (out / "results.json").exists():
        old = json.loads((out / "results.json").read_text())
        rows, runs, models = old.get("rows", []), old.get("runs", []), old.get("models", {})
        log(f"keeping {len(rows)} rows of {len(runs)} earlier run(s) in {out} (--fresh discards them)")
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    # import the library now: this run uses the version present at its start
    import mini_unlearn_jax.app.data  # noqa: F401
    import mini_unlearn_jax.core.linalg  # noqa: F401
    import mini_unlearn_jax.core.methods  # noqa: F401
    import mini_unlearn_jax.evaluation.metrics  # noqa: F401

    run = {"command": cmd, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "models": args.models, "ratios": args.ratios, "methods": [m[0] for m in args.methods], "seed": args.seed,
           "machine": machine_info(), "library": library_version(), "finished": False}
    runs.append(run)
    log(f"{cmd}\n  machine: {run['machine']}")

    def emit(row: dict) -> None:
        nonlocal rows
        k = row_key(row)
        rows = [r for r in rows if row_key(r) != k] + [row]
        run["wall_s"] = time.perf_counter() - T_START
        write_outputs(out, rows, runs, models)

    for name in args.models:
        tm = train_model(name, args)
        models[f"{name}:{tm.config['n_train']}:{args.seed}"] = tm.config
        for ratio in args.ratios:
            run_cell(tm, ratio, args.methods, args.seed, emit)
        del tm
    run["finished"] = True
    run["wall_s"] = time.perf_counter() - T_START
    end = library_version()
    if end.get("library_sha256") != run["library"].get("library_sha256"):
        run["library_at_end"] = end
        log(f"note: the library's sources changed during this run ({run['library']} -> {end}); "
            "this run used the version imported at its start")
    write_outputs(out, rows, runs, models)
    log(f"done in {run['wall_s']:.0f}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
