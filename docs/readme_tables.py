"""Write the README's generated tables: the methods (from the registry) and the headline results
(from the committed experiment results), between ``<!-- NAME:begin -->`` / ``<!-- NAME:end -->``;
and the CNN benchmark's tables in docs/results.md and experiments/cnn_benchmark/README.md, its
plot copied to docs/img/.

    python docs/readme_tables.py           # rewrite the generated blocks in place
    python docs/readme_tables.py --check   # exit 1 when they are not these

Nothing here measures anything: every figure is read from a committed results file, whose
command is named beside the table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS_PAGE = ROOT / "docs" / "results.md"
CNN_PLOT = ROOT / "docs" / "img" / "cnn_gap_vs_time.png"
MAIN = ROOT / "experiments/main/results/fashion_mnist-logreg/reports.json"
CNN = ROOT / "experiments/cnn_benchmark/results/cpu"
SEQUENTIAL = ROOT / "experiments/sequential_requests/results/results.json"


def methods_table() -> str:
    import mini_unlearn_jax as mu

    models = {"convex": "convex", "network": "networks", "any": "any"}
    rows = ["| method | models | what it does | cost | paper |", "|---|---|---|---|---|"]
    rows += [f"| `{m.name}` | {models[m.family]} | {m.summary} | {m.cost or '—'} | {m.paper or '—'} |"
             for m in (mu.get_method(n) for n in mu.METHODS)]
    return "\n".join(rows)


def convex_table() -> str:
    rep = json.loads(MAIN.read_text())
    rows = ["| removed | relative parameter error | KL ratio | test accuracy (retrained) | time ratio (with refresh) |",
            "|---:|---:|---:|---:|---:|"]
    for r in rep["rows"]:
        rows.append(f"| {r['ratio']:.0%} | {r['rel_param_error']:.3f} | {r['kl_ratio']:.3f} | "
                    f"{r['test_acc']:.4f} ({r['retrain_test_acc']:.4f}) | {r['solve_time_ratio']:.3f} "
                    f"({r['time_ratio']:.3f}) |")
    e = rep["end_to_end"]
    rows.append("")
    rows.append(f"Whole commands at {e['ratio']:.0%}: `unlearn --method {e['method']}` {e['method_wall_s']:.1f} s, "
                f"`unlearn --method retrain` {e['retrain_wall_s']:.1f} s. From `python experiments/main/run.py "
                "--update-reference` ([table](experiments/main/results/fashion_mnist-logreg/table.md)).")
    return "\n".join(rows)


def network_table() -> str:
    import tomllib

    summary = json.loads((CNN / "summary.json").read_text())
    cfg = tomllib.loads((CNN.parents[1] / "config.toml").read_text())
    requests = {"random10": "random 10 %", "class": f"class {cfg['forget_class']}", "mislabelled": "5 % mislabelled"}
    by = {(e["request"], e["method"]): e for e in summary}
    rows = ["| method | " + " | ".join(f"{label}: test / forget acc gap (pts), AUC gap, time ratio"
                                       for label in requests.values()) + " |",
            "|---|" + "---:|" * len(requests)]
    for m in cfg["methods"]:
        cells = []
        for q in requests:
            e = by.get((q, m))
            cells.append("—" if e is None else
                         f"{e['test_acc_gap'] * 100:+.1f} / {e['forget_acc_gap'] * 100:+.1f}, {e['auc_gap']:+.3f}, "
                         f"{e['time_ratio']:.3f}")
        rows.append(f"| `{m}` | " + " | ".join(cells) + " |")
    ref = [by[(q, "mini")] for q in requests if (q, "mini") in by]
    rows.append("")
    rows.append("Retraining's test accuracy / attack AUC: " + "; ".join(
        f"{requests[e['request']]} {e['retrain_test_acc']:.3f} / {e['retrain_auc']:.3f}" for e in ref)
        + f". Mean over seeds {', '.join(map(str, ref[0]['seeds']))}, every method tuned on the validation split; "
        "time ratio = the method's time / retraining's, compilation apart. From `python "
        "experiments/cnn_benchmark/run.py` ([table and plot](experiments/cnn_benchmark/README.md)).")
    return "\n".join(rows)


def stream_table() -> str:
    d = json.loads(SEQUENTIAL.read_text())
    recs, met = d["records"], d["criteria_met"]
    n, tol = len(recs), d["tolerances"]
    ratios = sorted(r["time_ratio"] for r in recs)
    return (f"A stream of {d['requests']} successive {d['fraction']:.0%} requests on the leaky MLP, seeds "
            f"{d['seeds']} ({n} requests; `python experiments/sequential_requests/run.py`, "
            f"[report](experiments/sequential_requests/README.md)): the model within {tol['auc']} AUC of a cumulative "
            f"retrain's in {met['model_ok']} of {n} requests, test accuracy within {tol['test_acc_pts']} points in "
            f"{met['acc_ok']} of {n}, every stored artefact at most {tol['auc']} above the retrain in "
            f"{met['stored_ok']} of {n}, at a median {ratios[n // 2]:.2f} of retraining's time per request "
            "(the refresh for the next request included).")


def cnn_tables() -> str:
    """The per-request tables of the benchmark's table.md, under its command and device line."""
    lines = (CNN / "table.md").read_text().splitlines()
    head = [line for line in lines if line.startswith(("Command:", "Device:", "Data:"))]
    start = next(i for i, line in enumerate(lines) if line.startswith("### "))
    end = next(i for i, line in enumerate(lines) if line.startswith("## Tuning"))
    return "\n".join(head + [""] + [line.replace("### ", "#### ", 1) for line in lines[start:end]]).rstrip()


TABLES = {"methods": methods_table, "convex": convex_table, "network": network_table, "stream": stream_table}
PAGE_TABLES = {"cnn": cnn_tables}


def render(text: str, tables=TABLES) -> str:
    for name, make in tables.items():
        pat = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pat.search(text):
            raise SystemExit(f"no <!-- {name}:begin --> ... <!-- {name}:end --> block in the page")
        body = make()
        text = pat.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if README.md's tables differ")
    args = p.parse_args(argv)
    pages = {README: TABLES, RESULTS_PAGE: PAGE_TABLES, CNN.parents[1] / "README.md": PAGE_TABLES}
    new = {page: render(page.read_text(), tables) for page, tables in pages.items()}
    plot = (CNN / "gap_vs_time.png").read_bytes()
    if args.check:
        stale = [p.name for p in pages if new[p] != p.read_text()]
        if not CNN_PLOT.exists() or CNN_PLOT.read_bytes() != plot:
            stale.append(str(CNN_PLOT.relative_to(ROOT)))
        if stale:
            print(f"generated blocks are stale in {', '.join(stale)}: run python docs/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    for page, text in new.items():
        page.write_text(text)
    CNN_PLOT.parent.mkdir(exist_ok=True)
    CNN_PLOT.write_bytes(plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
