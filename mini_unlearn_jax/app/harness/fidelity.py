"""The fidelity report: every cell, one table per metric, the targets check, fidelity vs time."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from pathlib import Path

import numpy as np

from ...core import registry as R
from .config import GridConfig, ratio_pct

# -- the fidelity report --------------------------------------------------------------------

FIDELITY_COLUMNS = ["model", "method", "options", "ratio_pct", "seed", "n_train", "n_removed", "reference",
                    "test_acc", "forget_acc", "retain_acc", "rel_param_error", "kl_test", "kl_forget",
                    "original_kl_test", "kl_ratio", "agreement", "time_s", "compile_s", "retrain_time_s",
                    "time_ratio", "memory_bytes", "param_bytes", "converged", "reason", "retrain_test_acc",
                    "original_test_acc", "forget_loss", "retrain_forget_loss", "forget_loss_ratio", "n_test",
                    "n_test_held_out", "retrain_retain_acc", "retrain_forget_acc", "original_retain_acc",
                    "original_forget_acc", "param_error"]


def _fidelity_row(row: dict) -> dict:
    """A grid row in the fidelity report's columns (ratio in percent, ``agreement``)."""
    src = dict(row, ratio_pct=ratio_pct(row["ratio"]))
    if "agreement_test" in src:
        src["agreement"] = src["agreement_test"]
    return {k: src[k] for k in [c for c in FIDELITY_COLUMNS if c != "options"] + ["info", "options"] if k in src}


def _fidelity_run(run: dict) -> dict:
    """A run record as the fidelity report has always stored it: ratios in percent, one ``seed``."""
    out = {}
    for k, v in run.items():
        if k == "seeds" and len(v) == 1:
            out["seed"] = v[0]
        else:
            out[k] = [ratio_pct(x) if isinstance(x, str) else x for x in v] if k == "ratios" else v
    return out


def _base(label: str) -> str:
    return label.partition(":")[0]


def _method_rank(label: str) -> tuple:
    """References first, then registration order (variants such as ``deltagrad:lr=0.1`` after their base)."""
    names = list(R.METHODS)
    order = [n for n in names if R.get_method(n).ground_truth] + [n for n in names if not R.get_method(n).ground_truth]
    base = _base(label)
    return (order.index(base) if base in order else len(order), label)


def _method_labels(rows: list) -> list:
    return sorted({r["method"] for r in rows}, key=_method_rank)


def _fmt(v, kind: str) -> str:
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


def _pct(r) -> str:
    return f"{float(r):g}%"


def _pivot(rows: list, key: str, kind: str, title: str) -> list[str]:
    ratios = sorted({float(r["ratio_pct"]) for r in rows})
    cell = {(r["method"], float(r["ratio_pct"])): r for r in rows}
    lines = [f"**{title}**", "", "| method | " + " | ".join(_pct(x) for x in ratios) + " |",
             "|---|" + "---:|" * len(ratios)]
    for m in _method_labels(rows):
        vals = []
        for x in ratios:
            r = cell.get((m, x))
            if r is None:
                vals.append("")
                continue
            s = _fmt(r.get(key), kind)
            if not r.get("converged", True):
                s += " ✗"
            vals.append(s)
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return lines + [""]


def _target_text(ratios) -> list[str]:
    """Ratios in percent without the sign (runs before the harness recorded percents as numbers)."""
    return [f"{ratio_pct(r) if isinstance(r, str) else r:g}" for r in ratios]


def _check_targets(rows: list, targets: dict) -> list[str]:
    if not targets:
        return []
    cell = {(r["method"], float(r["ratio_pct"])): r for r in rows}
    bounds = [(k, targets[k], label) for k, label in (("kl_ratio", "kl ratio"), ("rel_param_error", "rel err"),
                                                      ("time_ratio", "time ratio")) if k in targets]
    out = []
    for ratio in targets.get("ratios", []):
        pct = ratio_pct(ratio)
        r = cell.get((targets["method"], pct))
        if r is None or "kl_ratio" not in r:
            continue
        checks = [f"{label} {r[k]:.3g} {'≤' if r[k] <= bound else '>'} {bound}" for k, bound, label in bounds]
        ok = all(r[k] <= bound for k, bound, _ in bounds) and r["converged"]
        for d in rows:
            if _base(d["method"]) not in targets.get("beat", ()) or float(d["ratio_pct"]) != pct:
                continue
            better = r["kl_test"] < d["kl_test"]
            ok = ok and better
            checks.append(f"kl_test {r['kl_test']:.3g} {'<' if better else '≥'} {d['method']}'s {d['kl_test']:.3g}")
        out.append(f"- {_pct(pct)}: **{'PASS' if ok else 'FAIL'}** — " + "; ".join(checks)
                   + ("" if r["converged"] else f"; not converged ({r['reason']})"))
    return out


def _sort_fidelity(rows: list) -> list:
    return sorted(rows, key=lambda r: (r["model"], r["n_train"], r["seed"], float(r["ratio_pct"]),
                                       _method_rank(r["method"])))


def _fidelity_table(cfg: GridConfig, path: Path, rows: list, runs: list, models: dict) -> None:
    tg, truth = cfg.targets, R.ground_truth_method()
    lines = [f"# {cfg.title or 'Unlearning methods against retraining'}", ""] + ([cfg.intro, ""] if cfg.intro else [])
    by_model: dict = {}
    for r in rows:
        by_model.setdefault((r["model"], r["n_train"], r["seed"]), []).append(r)
    for (model, n_train, seed), mrows in by_model.items():
        mc = models.get(f"{model}:{n_train}:{seed}", {})
        tc = mc.get("train_config", {})
        lines += [f"## {model} — {mc.get('data_spec', '?')} (n_train={n_train}, seed={seed})", ""]
        if mc:
            lines += [f"l2={mc['l2']}" + (f", hidden={mc['hidden']}" if mc.get("hidden") else "")
                      + f", {tc.get('optimizer')} "
                      + ("full batch" if tc.get("batch_size") is None else f"batch {tc.get('batch_size')}")
                      + f", {mc['steps_run']} steps (final grad norm {mc['final_grad_norm']:.2e}); "
                      f"trained in {mc['train_s']:.1f}s; original train acc {mc['train_acc']:.4f}, "
                      f"test acc {mc['test_acc']:.4f}; {mc['param_count']} parameters "
                      f"({_fmt(mc['param_bytes'], 'bytes')}); snapshot buffer {_fmt(mc['snapshot_bytes'], 'bytes')}"
                      f" (K={tc.get('snapshots')}), curvature stats {_fmt(mc['stats_bytes'], 'bytes')}"
                      + (f", trajectory buffer {_fmt(mc['trajectory_bytes'], 'bytes')}" if mc.get("trajectory_bytes")
                         else "") + "."
                      + (f" Test metrics are on {mc['n_test']} test images: the other {mc['n_test_held_out']} are "
                         "the held-out split trajectory unlearning reads." if mc.get("n_test_held_out") else ""), ""]
        ok_rows = [r for r in mrows if "kl_ratio" in r]
        lines += _pivot(ok_rows, "kl_ratio", "sci",
                        "KL ratio: KL(p_R‖p_U) / KL(p_R‖p_original) on test (lower is better; 1 = did nothing)")
        lines += _pivot(ok_rows, "rel_param_error", "rel", "Relative parameter error ‖w_U−w_R‖ / ‖w*−w_R‖")
        lines += _pivot(ok_rows, "time_ratio", "sci", "Time ratio: time_s / retrain time_s of the same cell")
        lines += _pivot(ok_rows, "test_acc", "acc", "Test accuracy")
        lines += _pivot(ok_rows, "forget_acc", "acc", "Forget-set accuracy")
        lossy = [r for r in ok_rows if "forget_loss_ratio" in r]
        if lossy:  # rows written before the harness recorded it have none
            lines += _pivot(lossy, "forget_loss_ratio", "rel",
                            "Forget-set loss / the retrained model's (1 = as unseen as after retraining; near 0 = still memorised)")
        lines += _pivot(ok_rows, "agreement", "acc", "Test prediction agreement with the retrained model")
        lines += ["**All cells**", "",
                  "| ratio | method | test acc | forget acc | rel err | kl_test | kl ratio | agree | time s | "
                  "compile s | time ratio | memory | converged |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in mrows:
            if "kl_ratio" not in r:
                lines.append(f"| {_pct(r['ratio_pct'])} | {r['method']} | | | | | | | | | | | ✗ {r['reason']} |")
                continue
            conv = "yes" if r["converged"] else f"✗ {r['reason']}"
            lines.append(
                f"| {_pct(r['ratio_pct'])} | {r['method']} | {_fmt(r['test_acc'], 'acc')} | {_fmt(r['forget_acc'], 'acc')} | "
                f"{_fmt(r['rel_param_error'], 'rel')} | {_fmt(r['kl_test'], 'sci')} | {_fmt(r['kl_ratio'], 'sci')} | "
                f"{_fmt(r['agreement'], 'acc')} | {_fmt(r['time_s'], 'time')} | {_fmt(r['compile_s'], 'time')} | "
                f"{_fmt(r['time_ratio'], 'sci')} | {_fmt(r['memory_bytes'], 'bytes')} | {conv} |")
        lines.append("")
        for label in _method_labels([r for r in ok_rows if r.get("reference") not in (None, r["method"], truth)]):
            own = [r for r in ok_rows if r["method"] == label]
            lines += [f"`{label}` trains its own original model ({json.dumps(own[0]['info'].get('config', {}))}), so its "
                      f"reference is `{own[0]['reference']}` (its own recipe on the remaining data), its original "
                      "model is that recipe on all data, and its time ratio is against that reference's time. Its "
                      "own original/retrained test accuracy: "
                      + ", ".join(f"{_pct(r['ratio_pct'])}: {r['original_test_acc']:.4f}/{r['retrain_test_acc']:.4f}"
                                  for r in own) + ".", ""]
        checked = _check_targets(ok_rows, tg)
        if checked:
            bounds = ", ".join(f"{label} ≤ {tg[k]}" for k, label in (("kl_ratio", "kl ratio"), ("rel_param_error", "rel err"),
                                                                     ("time_ratio", "time ratio")) if k in tg)
            beat = "".join(f", kl_test below {b}'s" for b in tg.get("beat", ()))
            lines += [f"**Targets for `{tg['method']}` at {'/'.join(_target_text(tg.get('ratios', [])))}%** "
                      f"({bounds}{beat}):", ""] + checked + [""]
        bad = [r for r in mrows if not r.get("converged", True)]
        if bad:
            lines += ["**Not converged / failed:** " + "; ".join(
                f"{r['method']} at {_pct(r['ratio_pct'])} ({r['reason']})" for r in bad), ""]
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
                  f"{','.join(_target_text(run['ratios']))}; machine: nproc={mi['nproc']}, {mi['cpu']}, "
                  f"{mi['memory']}, jax {mi['jax']} (jaxlib {mi['jaxlib']}), device {mi['device']}, "
                  f"{mi['platform']}, Python {mi['python']}"]
    path.write_text("\n".join(lines) + "\n")


def _fidelity_plot(cfg: GridConfig, path: Path, rows: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in rows if "kl_ratio" in r and r["method"] != r.get("reference")]
    models = list(dict.fromkeys((r["model"], r["n_train"]) for r in rows))
    if not models:
        return
    labels = _method_labels(rows)
    markers = dict(zip(labels, itertools.cycle(["o", "v", "^", "s", "D", "X", "P", "*", "h", "p", "<", ">", "d"])))
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
        if "kl_ratio" in cfg.targets:
            ax.axhline(cfg.targets["kl_ratio"], color="tab:red", lw=0.6, ls=":")
        if "time_ratio" in cfg.targets:
            ax.axvline(cfg.targets["time_ratio"], color="tab:red", lw=0.6, ls=":")
        ax.set_xlabel("time_s / retrain time_s (same cell)")
        ax.set_ylabel("test KL(p_R‖p_U) / KL(p_R‖p_original)")
        ax.set_title(f"{model} (Fashion-MNIST, n={n_train})")
        ax.grid(True, which="both", alpha=0.25)
    handles = [Line2D([], [], marker=markers[m], ls="", color="grey", markeredgecolor="k", label=m) for m in labels]
    handles += [Line2D([], [], marker="o", ls="", color=color[x], label=f"{x:g}%") for x in ratios]
    handles += [Line2D([], [], marker="o", ls="", color="w", markeredgecolor="r", markeredgewidth=1.8,
                       label="not converged")]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle("Fidelity vs cost (DeltaGrad against its own (S)GD retrain)"
                 + (f"; red dotted: {cfg.targets['method']} targets" if cfg.targets else ""))
    fig.tight_layout(rect=(0, 0, 0.88, 0.95))
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, path)


def _fidelity_reports(cfg: GridConfig, out: Path, rows: list, runs: list, models: dict) -> None:
    frows = _sort_fidelity([_fidelity_row(r) for r in rows])
    runs = [_fidelity_run(r) for r in runs]
    tmp = out / "results.json.partial"
    tmp.write_text(json.dumps({"runs": runs, "models": models, "rows": frows}, indent=1, default=float))
    os.replace(tmp, out / "results.json")
    tmp = out / "results.csv.partial"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIDELITY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in frows:
            w.writerow(r)
    os.replace(tmp, out / "results.csv")
    _fidelity_table(cfg, out / "table.md", frows, runs, models)
    _fidelity_plot(cfg, out / "fidelity_vs_time.png", frows)


