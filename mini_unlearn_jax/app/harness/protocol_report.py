"""The benchmark protocol's report (``protocol.py``): ``table.md``, ``summary.json`` and
``gap_vs_time.png`` from the rows of ``results.jsonl`` and the confidences in ``phi/``.

Per request and method, over the seeds (mean, and the spread as ``±`` one standard deviation):

- test, forget and retain accuracy with their gaps to retraining (the per-seed difference);
- the population attack's AUC (forget set against test images) next to retraining's, and its
  indiscernibility;
- ``time`` = the method's time / retraining's (compilation apart) and RTE = its inverse;
- ``gap score`` = Deep Unlearn's tuning objective evaluated on the test set,
  ``sqrt((dRA/3)^2 + (dFA/3)^2 + (dTA/3)^2 + (dMIA/0.5)^2)`` with the attack's accuracy for
  ``MIA`` (0 is retraining itself, lower is better);
- the NeurIPS 2023 challenge's *forget score* ``F`` from per-example epsilons
  (:func:`~mini_unlearn_jax.evaluation.attacks.forget_score` with the challenge's point
  estimates) on the seeds' unlearned against retrained models, and its final score
  ``F * (RA / RA_retrain) * (TA / TA_retrain)``. The challenge used 512 models per side; with
  one model per seed the epsilon can only resolve ``ceil(log(m - 1))`` and sampling noise
  alone costs points, so compare methods with it, not with the challenge's leaderboard.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...evaluation.attacks import forget_score

_ACC = ("test_acc", "forget_acc", "retain_acc")


def _ms(vals) -> tuple[float, float]:
    v = np.asarray([x for x in vals if x is not None], float)
    return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))


def gap_score(row: dict) -> float:
    """Deep Unlearn's objective on the test set for one row (see the module docstring)."""
    d = lambda k: abs(row[k] - row[f"retrain_{k}"])
    return float(np.sqrt(sum((d(k) / 3) ** 2 for k in _ACC) + (d("mia_accuracy") / 0.5) ** 2))


def _forget_scores(out: Path, request: str, method: str, seeds: list[int]) -> float | None:
    phi = out / "phi"
    u = [phi / f"{request}__{method}__{s}.npy" for s in seeds]
    r = [phi / f"{request}__retrain__{s}.npy" for s in seeds]
    if len(seeds) < 3 or not all(p.exists() for p in u + r):
        return None
    return forget_score(np.stack([np.load(p) for p in u]), np.stack([np.load(p) for p in r]), confidence=None)


def summarize(rows: list[dict], out: Path) -> list[dict]:
    """One entry per (request, method): the means, spreads and scores of the module docstring."""
    groups: dict = {}
    for r in rows:
        if r.get("converged") and r.get("test_acc") is not None:
            groups.setdefault((r["request"], r["method"]), []).append(r)
    summary = []
    for (request, method), rs in groups.items():
        seeds = sorted(int(r["seed"]) for r in rs)
        e = {"request": request, "method": method, "seeds": seeds, "options": rs[0]["options"]}
        for k in (*_ACC, "auc", "indiscernibility"):
            e[k], e[f"{k}_std"] = _ms(r[k] for r in rs)
            e[f"retrain_{k}"], _ = _ms(r[f"retrain_{k}"] for r in rs)
            if k in _ACC or k == "auc":
                e[f"{k}_gap"], e[f"{k}_gap_std"] = _ms(r[k] - r[f"retrain_{k}"] for r in rs)
        e["original_forget_acc"], _ = _ms(r["original_forget_acc"] for r in rs)
        e["original_auc"], _ = _ms(r["original_auc"] for r in rs)
        e["time_ratio"], e["time_ratio_std"] = _ms(r["time_s"] / r["retrain_time_s"] for r in rs)
        e["rte"] = 1.0 / e["time_ratio"]
        e["compile_s"], _ = _ms(r["compile_s"] for r in rs)
        e["wall_s"], _ = _ms(r["wall_s"] for r in rs)
        e["wall_ratio"], _ = _ms(r["wall_s"] / (r["retrain_time_s"] + r["retrain_compile_s"]) for r in rs)
        e["within_budget"] = all(r["within_budget"] for r in rs)
        e["gap_score"], e["gap_score_std"] = _ms(gap_score(r) for r in rs)
        f = _forget_scores(out, request, method, seeds)
        e["forget_score"] = f
        e["final_score"] = None if f is None else f * (e["retain_acc"] / e["retrain_retain_acc"]) * (
            e["test_acc"] / e["retrain_test_acc"])
        summary.append(e)
    return summary


def _fmt_options(options: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(options.items())) or "defaults"


def _table(summary: list[dict], request: str, methods: list[str]) -> list[str]:
    rows = {e["method"]: e for e in summary if e["request"] == request}
    if not rows:
        return []
    any_e = next(iter(rows.values()))
    lines = [f"### {request}", "",
             f"Retraining: test {any_e['retrain_test_acc']:.4f}, forget {any_e['retrain_forget_acc']:.4f}, "
             f"retain {any_e['retrain_retain_acc']:.4f}, attack AUC {any_e['retrain_auc']:.3f}. "
             f"The original model: forget {any_e['original_forget_acc']:.4f}, attack AUC {any_e['original_auc']:.3f}.",
             "",
             "| method | setting (tuned) | test acc gap | forget acc gap | retain acc gap | attack AUC (retrain) | "
             "indisc. | time / retrain | RTE | with compilation | gap score | forget score F | F x RA x TA |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pm = lambda e, k: f"{e[k] * 100:+.2f} ± {e[k + '_std'] * 100:.2f}"
    for m in methods:
        if m not in rows:
            continue
        e = rows[m]
        budget = "" if e["within_budget"] else " (over budget)"
        f = "—" if e["forget_score"] is None else f"{e['forget_score']:.3f}"
        fs = "—" if e["final_score"] is None else f"{e['final_score']:.3f}"
        lines.append(f"| `{m}` | {_fmt_options(e['options'])} | {pm(e, 'test_acc_gap')} | {pm(e, 'forget_acc_gap')} | "
                     f"{pm(e, 'retain_acc_gap')} | {e['auc']:.3f} ± {e['auc_std']:.3f} ({e['retrain_auc']:.3f}) | "
                     f"{e['indiscernibility']:.3f} | {e['time_ratio']:.3f}{budget} | {e['rte']:.1f} | "
                     f"{e['wall_ratio']:.3f} | {e['gap_score']:.4f} | {f} | {fs} |")
    return lines + [""]


#: What :func:`write_report` writes into the output directory.
REPORT_FILES = ("table.md", "summary.json", "gap_vs_time.png")


def write_report(cfg, rows: list[dict], tuning: list[dict], runs: list[dict], out: Path, *, command: str = "") -> None:
    """Write ``table.md``, ``summary.json`` and ``gap_vs_time.png`` into ``out``; ``runs`` are the
    invocations that produced the rows (``runs.jsonl``: command, seconds, machine)."""
    summary = summarize(rows, out)
    methods = list(cfg.methods)
    devices = sorted({r.get("device", "?") for r in rows})
    n = rows[0] if rows else {}
    machine = runs[-1]["machine"] if runs else {}
    commands = sorted({r["command"] for r in runs}) or [command]
    head = [f"# Unlearning benchmark: {cfg.model} on {cfg.data}", "",
            f"Command: {', '.join(f'`{c}`' for c in commands)}  ",
            f"Device: {', '.join(devices)}; machine: {machine.get('cpu', '?')}, {machine.get('nproc', '?')} cores, {machine.get('memory', '?')}. "
            f"Whole run: {sum(r['seconds'] for r in runs) / 60:.1f} min in {len(runs)} invocation(s), "
            "compilation, training, tuning and evaluation included.  ",
            f"Data: {n.get('n_train', '?')} training images ({n.get('n_val', '?')} more held out as the validation "
            f"split), {n.get('n_test', '?')} unread test images; seeds {list(cfg.seeds)}; every method tuned on the "
            f"validation split at seed {cfg.tune_seed}.",
            "",
            "Gaps are the method's value minus retraining's, in accuracy points (mean ± std over seeds). "
            "`time / retrain` counts both runs without compilation (RTE is its inverse); the challenge's budget is "
            f"{cfg.budget:g} of retraining. `with compilation` is the method's whole call, compilation "
            "included, over retraining's time and compilation (retraining reuses the training's compiled "
            "program, so its compilation is mostly 0 here). The gap score is Deep Unlearn's objective on the test set (lower is "
            "better); F is the NeurIPS 2023 forget score from the seeds' models (one per seed and side; see "
            "`mini_unlearn_jax/app/harness/protocol_report.py`).", ""]
    body = [line for q in cfg.requests for line in _table(summary, q, methods)]
    tune = ["## Tuning", "", "Each method's grid point with the lowest validation score (`tuning.jsonl` holds every "
            "point):", "", "| request | method | points | best setting | validation score |", "|---|---|---|---|---|"]
    by = {}
    for t in tuning:
        by.setdefault((t["request"], t["method"]), []).append(t)
    for (q, m), ts in sorted(by.items(), key=lambda kv: (cfg.requests.index(kv[0][0]), methods.index(kv[0][1])
                                                           if kv[0][1] in methods else 99)):
        best = min(ts, key=lambda t: t["score"])
        tune.append(f"| {q} | `{m}` | {len(ts)} | {_fmt_options(best['options'])} | {best['score']:.4f} |")
    table, summary_json, plot = (out / name for name in REPORT_FILES)
    table.write_text("\n".join(head + body + tune) + "\n")
    summary_json.write_text(json.dumps(summary, indent=1, default=float))
    _plot(summary, cfg, plot)


def _plot(summary: list[dict], cfg, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    reqs = [q for q in cfg.requests if any(e["request"] == q for e in summary)]
    if not reqs:
        return
    fig, axes = plt.subplots(1, len(reqs), figsize=(4.6 * len(reqs), 4), squeeze=False)
    for ax, q in zip(axes[0], reqs, strict=True):
        for e in (e for e in summary if e["request"] == q):
            ax.scatter(e["time_ratio"], abs(e["auc_gap"]), s=36, marker="*" if e["method"] == "mini" else "o")
            ax.annotate(e["method"], (e["time_ratio"], abs(e["auc_gap"])), fontsize=8, xytext=(3, 3),
                        textcoords="offset points")
        ax.axvline(cfg.budget, color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
                 if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]] or [cfg.budget]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("time / retraining (compilation apart)")
        ax.set_ylabel("|attack AUC - retraining's|")
        ax.set_title(q)
    fig.suptitle(f"{cfg.model} on {cfg.data}: forgetting gap against time (dashed: the challenge's budget)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
