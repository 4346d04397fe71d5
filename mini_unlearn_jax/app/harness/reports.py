"""The grid report: results.csv, results.json, the mean ± std table and the plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ...core import registry as R
from .cells import _forget_scores
from .config import METRICS, GridConfig, parse_ratio
from .fidelity import _fidelity_reports

# -- reports --------------------------------------------------------------------------------


def write_reports(cfg: GridConfig, rows: list[dict], *, command: str = "", runs=(), models=None) -> None:
    """Write ``cfg.out``'s reports in the format ``cfg.report`` (see the module docstring)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.report == "fidelity":
        _fidelity_reports(cfg, out, rows, list(runs), dict(models or {}))
    else:
        _grid_reports(cfg, out, rows, command)


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


def _mean_of(rows: list[dict], key: str) -> float:
    vals = [float(r[key]) for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else float("nan")


def _grid_reports(cfg: GridConfig, out: Path, rows: list[dict], command: str) -> None:
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=float))
    cols = sorted({k for r in rows for k in r} - {"info"})
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    methods_rows = [r for r in rows if r["method"] != r.get("reference")]  # the reference has its own line
    summ = summarize(methods_rows)
    lines = [f"# {cfg.title or 'Unlearning grid: mean ± std over seeds'}", ""]
    lines += [cfg.intro, ""] if cfg.intro else []
    lines += [f"Command: `{command}`", ""]
    shown = [("test_acc", "test acc", "{:.4f}"), ("kl_ratio", "KL ratio", "{:.3g}"),
             ("rel_param_error", "rel. param error", "{:.3f}"), ("time_ratio", "time / retrain", "{:.3g}"),
             ("mia_auc", "MIA AUC (loss)", "{:.3f}"),
             ("forget_loss_ratio", "forget-set loss / retrain's (1: as unseen as after retraining)", "{:.3f}")]
    for data, model in sorted({(k[0], k[1]) for k in summ}):
        ratios = sorted({k[2] for k in summ if k[:2] == (data, model)}, key=_ratio_sort)
        methods = sorted({k[3] for k in summ if k[:2] == (data, model)})
        lines += [f"## {model} on {data}", ""]
        held = {(r.get("n_test"), r.get("n_test_held_out")) for r in rows
                if (r["data"], r["model"]) == (data, model) and r.get("n_test_held_out")}
        if held:
            n_test, n_held = max(held)
            lines += [f"Test metrics are on {n_test} test images: the other {n_held} are the held-out split "
                      "trajectory unlearning reads.", ""]
        of = {rt: [r for r in rows if (r["data"], r["model"], str(r["ratio"])) == (data, model, rt)] for rt in ratios}
        # the retrain line: rows measured against the shared retrain only (DeltaGrad's rows carry its
        # own SGD retrain's figures; rows written before the reference was recorded are left out)
        shared = {rt: [r for r in of[rt] if r.get("reference") == R.ground_truth_method()] for rt in ratios}
        reference_line = {"test_acc": ("retrain_test_acc", "{:.4f}"), "mia_auc": ("mia_auc_retrain", "{:.3f}")}
        for metric, title, fmtx in shown:
            lines += [f"**{title}**", "", "| method | " + " | ".join(ratios) + " |", "|---|" + "---:|" * len(ratios)]
            if metric in reference_line:
                key, f = reference_line[metric]
                lines.append("| retrain | " + " | ".join(f.format(_mean_of(shared[rt], key)) for rt in ratios) + " |")
            for meth in methods:
                cellsx = []
                for rt in ratios:
                    s = summ.get((data, model, rt, meth), {}).get(metric)
                    cellsx.append("—" if s is None else (fmtx.format(s[0]) + (f" ± {fmtx.format(s[1])}" if s[2] > 1 else "")))
                lines.append(f"| {meth} | " + " | ".join(cellsx) + " |")
            lines.append("")
    if cfg.forget_score:
        scores = _forget_scores(cfg, out, rows)
        (out / "forget_score.json").write_text(json.dumps(scores, indent=1, default=float))
        lines += ["## Forget score (NeurIPS 2023 unlearning challenge metric)", "",
                  "Per forget example, the best threshold or interval attack on the seeds' LiRA statistics separates "
                  "unlearned from retrained models with an epsilon (Clopper-Pearson bounds at 95 %); the score averages "
                  "2^-bucket(epsilon) over examples: 1 = indistinguishable, 0 = separable. With m seeds per side it "
                  "resolves epsilons up to ceil(log(m - 1)): 8 seeds give a coarse score, the challenge used 512 "
                  "models.", "",
                  "| data | model | ratio | method | seeds | forget score |", "|---|---|---|---|---:|---:|"]
        for e in scores:
            v = "—" if e["forget_score"] is None else f"{e['forget_score']:.3f}"
            lines.append(f"| {e['data']} | {e['model']} | {e['ratio']} | {e['method']} | {e['seeds']} | {v} |")
        lines.append("")
    (out / "table.md").write_text("\n".join(lines))
    _grid_plots(rows, summ, out)


def _grid_plots(rows, summ, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = sorted({(k[0], k[1]) for k in summ})
    if not pairs:
        return
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
                              if (r["data"], r["model"]) == (data, model) and parse_ratio(r["ratio"])[0] == "uniform"
                              and r.get(key) is not None})
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, "k--", label=R.ground_truth_method())
            ax.set_xscale("log")
            if logy:
                ax.set_yscale("log")
            ax.set_xlabel("removal ratio")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{model} on {data}")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4), squeeze=False)
    for ax, (data, model) in zip(axes[0], pairs, strict=True):
        plotted = False
        for meth in sorted({k[3] for k in summ if k[:2] == (data, model)}):
            pts = [(v["time_ratio"][0], v["kl_ratio"][0]) for k, v in summ.items()
                   if k[:2] == (data, model) and k[3] == meth and "kl_ratio" in v and v["kl_ratio"][0] > 0
                   and v["time_ratio"][0] > 0]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.scatter(xs, ys, label=meth, s=18)
                plotted = True
        if plotted:  # log axes need positive values; an empty panel says why it is empty
            ax.set_xscale("log")
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no positive KL and time ratios to plot", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_xlabel("time / retrain time")
        ax.set_ylabel("KL(p_R || p_U) / KL(p_R || p_original)")
        ax.set_title(f"fidelity vs time: {model} on {data}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fidelity_vs_time.png", dpi=110)
    plt.close(fig)


