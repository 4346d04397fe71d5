"""A resumable experiment grid: datasets x models x methods x ratios x seeds.

The grid is described by a TOML file (see ``experiments/grid.toml``)::

    out = "experiments/results/grid"
    seeds = [0, 1, 2]
    ratios = [0.01, 0.05, 0.1, 0.2, 0.3, 0.5]   # plus "class0" (a whole class) and "seq5x0.1"
    methods = ["mini", "mini-lite", ...]
    mia = true
    [[models]]
    data = "fashion_mnist:n_train=10000"
    model = "logreg"
    l2 = 1e-3

Every cell (data, model, seed, ratio, method) becomes one row of ``results.jsonl``, appended
as soon as it is done, so an interrupted run resumes where it stopped (cells already present
are skipped; several workers with disjoint configs may share one output directory).
:func:`write_reports` turns the rows into ``results.csv``, ``results.json``, a
Markdown table of mean ± std over seeds and PNG plots. A dataset that cannot be loaded here
(e.g. ``tfds:higgs`` without a network) is skipped with a message.

Special ratios: ``classK`` removes every training example of class K; ``seqMxF`` runs M
successive requests of fraction F of the original data (each on the previous result) and
compares the final model with retraining on the cumulative remainder.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from ..core import linalg as cv
from ..core import methods as M
from ..core.models import build_model, init_params, make_objective
from ..core.snapshots import nbytes
from ..core.training import Trainer, default_config
from ..evaluation import metrics as mt
from .data import DataError, load_dataset

METRICS = ("test_acc", "forget_acc", "rel_param_error", "kl_test", "kl_ratio", "agreement_test", "time_ratio",
           "time_s", "compile_s", "mia_auc", "memory_bytes")


@dataclasses.dataclass
class GridConfig:
    out: str
    seeds: list
    ratios: list
    methods: list
    models: list
    mia: bool = True

    @classmethod
    def load(cls, path: str | Path) -> GridConfig:
        import tomllib

        with open(path, "rb") as f:
            raw = tomllib.load(f)
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        cfg = cls(**raw)
        for m in cfg.methods:
            if m not in M.METHODS or m == "retrain":
                raise ValueError(f"{path}: unknown method {m!r} (retrain is always the reference)")
        for r in cfg.ratios:
            parse_ratio(r)
        return cfg

    def cells(self) -> list[dict]:
        return [{"data": m["data"], "model": m["model"], "seed": s, "ratio": str(r), "method": meth}
                for m in self.models for s in self.seeds for r in self.ratios for meth in self.methods]


def parse_ratio(r) -> tuple[str, float | int, int]:
    """``0.1`` -> ("uniform", 0.1, 1); ``"class3"`` -> ("class", 3, 1); ``"seq5x0.1"`` -> ("seq", 0.1, 5)."""
    text = str(r)
    if text.startswith("class"):
        return "class", int(text[5:]), 1
    if text.startswith("seq"):
        times, frac = text[3:].split("x")
        return "seq", float(frac), int(times)
    value = float(text)
    if not 0 < value < 1:
        raise ValueError(f"ratio {r!r} must lie in (0, 1), or be classK / seqMxF")
    return "uniform", value, 1


def key_of(row: dict) -> tuple:
    return (row["data"], row["model"], int(row["seed"]), str(row["ratio"]), row["method"])


def load_rows(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interruption: that cell reruns
                continue
    return rows


class _Trained:
    def __init__(self, spec: dict, seed: int):
        ds = load_dataset(spec["data"])
        model = build_model(spec["model"], ds.num_classes, hidden=int(spec.get("hidden", 256)))
        obj = make_objective(model, float(spec.get("l2", 1e-3)))
        cfg = default_config(spec["model"], ds.n_train, seed=seed)
        if "steps" in spec:
            cfg = dataclasses.replace(cfg, steps=int(spec["steps"]))
        p0 = init_params(model, ds.x_train[0], seed)
        st = Trainer(obj, cfg).fit(p0, ds.x_train, ds.y_train)
        stats = cv.fit_stats(obj, st.params, ds.x_train)
        self.ds = ds
        self.problem = M.Problem(obj, cfg, p0, st.params, st.snapshots, stats, jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
        self.memory = nbytes(st.snapshots) + (nbytes(stats) if stats is not None else 0)


def _forget(kind, value, n, y, seed):
    if kind == "class":
        return np.flatnonzero(np.asarray(y) == value).astype(np.int32)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, max(1, int(round(value * n))), replace=False)).astype(np.int32)


def _evaluate(tr: _Trained, method: str, out, ref, original, forget, mia: bool) -> dict:
    pb, ds = tr.problem, tr.ds
    obj = pb.objective
    p_ref = mt.predict_probs(obj, ref.params, ds.x_test)
    p_u = mt.predict_probs(obj, out.params, ds.x_test)
    p_o = mt.predict_probs(obj, original, ds.x_test)
    kl, kl0 = mt.mean_kl(p_ref, p_u), mt.mean_kl(p_ref, p_o)
    row = {
        "converged": bool(out.converged), "reason": out.reason,
        "test_acc": mt.accuracy(p_u, ds.y_test), "retrain_test_acc": mt.accuracy(p_ref, ds.y_test),
        "forget_acc": mt.accuracy(mt.predict_probs(obj, out.params, np.asarray(pb.x)[forget]), np.asarray(pb.y)[forget]),
        "rel_param_error": mt.rel_param_error(out.params, ref.params, original),
        "kl_test": kl, "kl_ratio": kl / max(kl0, 1e-30), "agreement_test": mt.agreement(p_ref, p_u),
        "time_s": out.time_s, "compile_s": out.compile_s, "retrain_time_s": ref.time_s,
        "time_ratio": out.time_s / max(ref.time_s, 1e-12),
        "memory_bytes": int(out.info.get("cache_bytes", tr.memory if method.startswith("mini") else 0)),
    }
    if mia:
        from ..evaluation.privacy import default_mia

        res = default_mia(obj, {"u": out.params, "r": ref.params}, np.asarray(pb.x)[forget], np.asarray(pb.y)[forget],
                          ds.x_test, ds.y_test)
        row["mia_auc"], row["mia_auc_retrain"] = res["u"]["auc"], res["r"]["auc"]
    return row


def run_grid(cfg: GridConfig, *, log=None) -> list[dict]:
    """Run every missing cell of the grid; returns all rows (old and new)."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(out)
    done = {key_of(r) for r in rows}
    todo = [c for c in cfg.cells() if key_of(c) not in done]
    log(f"grid: {len(cfg.cells())} cells, {len(done)} already done, {len(todo)} to run -> {out}")
    t0 = time.perf_counter()
    trained: dict = {}
    skipped: set = set()
    finished = 0
    sink_path = out / "results.jsonl"
    if sink_path.exists() and sink_path.stat().st_size and not sink_path.read_bytes().endswith(b"\n"):
        with open(sink_path, "a") as f:  # an interrupted write left half a line: close it off
            f.write("\n")
    with open(sink_path, "a") as sink:
        for cell in todo:
            spec = next(m for m in cfg.models if m["data"] == cell["data"] and m["model"] == cell["model"])
            tkey = (cell["data"], cell["model"], cell["seed"])
            if cell["data"] in skipped or key_of(cell) in {key_of(r) for r in load_rows(out)}:
                continue  # (another worker on the same output directory may have done it)
            if tkey not in trained:
                try:
                    trained = {tkey: _Trained(spec, cell["seed"])}  # keep one trained model in memory
                except DataError as e:
                    log(f"grid: skipping {cell['data']}: {e}")
                    skipped.add(cell["data"])
                    continue
            tr = trained[tkey]
            kind, value, times = parse_ratio(cell["ratio"])
            row = dict(cell, n_train=tr.ds.n_train)
            if kind == "seq":
                row.update(_run_sequential(tr, cell["method"], value, times, cell["seed"], cfg.mia))
            else:
                forget = _forget(kind, value, tr.ds.n_train, tr.ds.y_train, cell["seed"])
                ref_key = (tkey, cell["ratio"])
                if getattr(tr, "ref_key", None) != ref_key:
                    tr.ref_key, tr.ref = ref_key, M.run_method("retrain", tr.problem, forget)
                res = M.run_method(cell["method"], tr.problem, forget)
                ref = M.deltagrad_retrain(tr.problem, forget) if cell["method"] == "deltagrad" else tr.ref
                original = res.info.get("own_original", tr.problem.params)
                row.update(_evaluate(tr, cell["method"], res, ref, original, forget, cfg.mia), n_removed=int(forget.size))
            sink.write(json.dumps(row, default=float) + "\n")
            sink.flush()
            rows.append(row)
            finished += 1
            elapsed = time.perf_counter() - t0
            eta = elapsed / finished * (len(todo) - finished)
            bar = "#" * int(30 * finished / len(todo))
            log(f"[{bar:<30}] {finished}/{len(todo)}  {elapsed / 60:5.1f} min, ETA {eta / 60:5.1f} min  "
                f"{cell['model']} {cell['ratio']} seed {cell['seed']} {cell['method']}: kl_ratio {row['kl_ratio']:.3g} "
                f"time_ratio {row['time_ratio']:.3g}")
    return rows


def _run_sequential(tr: _Trained, method: str, frac: float, times: int, seed: int, mia: bool) -> dict:
    """``times`` successive requests of ``frac * n`` each, against retraining on the remainder."""
    pb = tr.problem
    n = tr.ds.n_train
    order = np.random.default_rng(seed).permutation(n)
    per = int(round(frac * n))
    alive = np.arange(n)
    cur = pb
    total_time = 0.0
    ok = True
    reason = "converged"
    for k in range(times):
        chunk = np.sort(order[k * per:(k + 1) * per])
        local = np.searchsorted(alive, chunk).astype(np.int32)
        res = M.run_method(method, cur, local)
        total_time += res.time_s
        ok &= res.converged
        if not res.converged:
            reason = res.reason
        cur = M.after_removal(cur, res.params, local)
        alive = np.setdiff1d(alive, chunk)
    forget = np.sort(order[: times * per])
    ref = M.run_method("retrain", pb, forget)
    out = M.MethodOutput(cur.params, ok, reason, total_time, 0.0, {})
    row = _evaluate(tr, method, out, ref, pb.params, forget, mia)
    row["n_removed"] = int(forget.size)
    return row


# -- reports --------------------------------------------------------------------------------


def _ratio_sort(r: str):
    kind, value, times = parse_ratio(r)
    return ({"uniform": 0, "class": 1, "seq": 2}[kind], value, times)


def summarize(rows: list[dict]) -> dict:
    """``{(data, model, ratio, method): {metric: (mean, std, count)}}`` over seeds."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["data"], r["model"], str(r["ratio"]), r["method"]), []).append(r)
    out = {}
    for k, rs in groups.items():
        stats = {}
        for m in METRICS:
            vals = np.array([float(r[m]) for r in rs if m in r and r[m] is not None], float)
            if vals.size:
                stats[m] = (float(vals.mean()), float(vals.std()), int(vals.size))
        stats["converged"] = (float(np.mean([r["converged"] for r in rs])), 0.0, len(rs))
        out[k] = stats
    return out


def write_reports(rows: list[dict], out: str | Path, command: str = "") -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=float))
    cols = sorted({k for r in rows for k in r})
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    summ = summarize(rows)
    lines = ["# Unlearning grid: mean ± std over seeds", "", f"Command: `{command}`", ""]
    shown = [("test_acc", "test acc", "{:.4f}"), ("kl_ratio", "KL ratio", "{:.3g}"),
             ("rel_param_error", "rel. param error", "{:.3f}"), ("time_ratio", "time / retrain", "{:.3g}"),
             ("mia_auc", "MIA AUC (loss)", "{:.3f}")]
    for data, model in sorted({(k[0], k[1]) for k in summ}):
        ratios = sorted({k[2] for k in summ if k[:2] == (data, model)}, key=_ratio_sort)
        methods = sorted({k[3] for k in summ if k[:2] == (data, model)})
        lines += [f"## {model} on {data}", ""]
        retrain_acc = {rt: np.mean([float(r["retrain_test_acc"]) for r in rows
                                     if (r["data"], r["model"], str(r["ratio"])) == (data, model, rt)]) for rt in ratios}
        mia_ret = {rt: np.mean([float(r.get("mia_auc_retrain", np.nan)) for r in rows
                                if (r["data"], r["model"], str(r["ratio"])) == (data, model, rt)]) for rt in ratios}
        for metric, title, fmtx in shown:
            lines += [f"**{title}**", "", "| method | " + " | ".join(ratios) + " |", "|---|" + "---:|" * len(ratios)]
            if metric == "test_acc":
                lines.append("| retrain | " + " | ".join(f"{retrain_acc[rt]:.4f}" for rt in ratios) + " |")
            if metric == "mia_auc":
                lines.append("| retrain | " + " | ".join(f"{mia_ret[rt]:.3f}" for rt in ratios) + " |")
            for meth in methods:
                cellsx = []
                for rt in ratios:
                    s = summ.get((data, model, rt, meth), {}).get(metric)
                    cellsx.append("—" if s is None else (fmtx.format(s[0]) + (f" ± {fmtx.format(s[1])}" if s[2] > 1 else "")))
                lines.append(f"| {meth} | " + " | ".join(cellsx) + " |")
            lines.append("")
    (out / "table.md").write_text("\n".join(lines))
    _plots(rows, summ, out)


def _plots(rows, summ, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = sorted({(k[0], k[1]) for k in summ})
    for metric, ylabel, fname, logy in (("test_acc", "test accuracy", "test_acc_vs_ratio.png", False),
                                        ("mia_auc", "MIA AUC (loss attack)", "mia_auc_vs_ratio.png", False),
                                        ("time_ratio", "time / retrain time", "time_ratio_vs_ratio.png", True)):
        fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4), squeeze=False)
        for ax, (data, model) in zip(axes[0], pairs, strict=True):
            for meth in sorted({k[3] for k in summ if k[:2] == (data, model)}):
                pts = sorted([(parse_ratio(k[2])[1], v[metric][0], v[metric][1]) for k, v in summ.items()
                              if k[:2] == (data, model) and k[3] == meth and parse_ratio(k[2])[0] == "uniform"
                              and metric in v])
                if pts:
                    xs, ys, es = zip(*pts, strict=True)
                    ax.errorbar(xs, ys, yerr=es, marker="o", label=meth, capsize=2)
            if metric in ("test_acc", "mia_auc"):
                key = "retrain_test_acc" if metric == "test_acc" else "mia_auc_retrain"
                pts = sorted({(parse_ratio(r["ratio"])[1], float(r.get(key, np.nan))) for r in rows
                              if (r["data"], r["model"]) == (data, model) and parse_ratio(r["ratio"])[0] == "uniform"})
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, "k--", label="retrain")
            ax.set_xscale("log")
            if logy:
                ax.set_yscale("log")
            ax.set_xlabel("removal ratio")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{model} on {data}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4), squeeze=False)
    for ax, (data, model) in zip(axes[0], pairs, strict=True):
        for meth in sorted({k[3] for k in summ if k[:2] == (data, model)}):
            pts = [(v["time_ratio"][0], v["kl_ratio"][0]) for k, v in summ.items()
                   if k[:2] == (data, model) and k[3] == meth and "kl_ratio" in v and v["kl_ratio"][0] > 0]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.scatter(xs, ys, label=meth, s=18)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("time / retrain time")
        ax.set_ylabel("KL(p_R || p_U) / KL(p_R || p_original)")
        ax.set_title(f"fidelity vs time: {model} on {data}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fidelity_vs_time.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Run (or resume) an unlearning grid from a TOML config.")
    ap.add_argument("config")
    ap.add_argument("--out", help="override the config's output directory")
    args = ap.parse_args(argv)
    cfg = GridConfig.load(args.config)
    if args.out:
        cfg.out = args.out
    rows = run_grid(cfg)
    write_reports(rows, cfg.out, command="python experiments/grid.py " + " ".join(argv or sys.argv[1:]))
    print(Path(cfg.out) / "table.md")
    return 0
