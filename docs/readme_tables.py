"""Write the README's generated tables: the methods (from the registry) and the headline results
(from the committed experiment results), between ``<!-- NAME:begin -->`` / ``<!-- NAME:end -->``.

    python docs/readme_tables.py           # rewrite README.md's tables in place
    python docs/readme_tables.py --check   # exit 1 when README.md's tables are not these

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
MAIN = ROOT / "experiments/main/results/fashion_mnist-logreg/reports.json"
PRIVACY = ROOT / "experiments/privacy/results/default/results.json"
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


def _ci(v, fmt="{:+.3f}") -> str:
    return f"{fmt.format(v[0])} [{fmt.format(v[1])}, {fmt.format(v[2])}]"


def network_table() -> str:
    d = json.loads(PRIVACY.read_text())
    shown = {"mini": "`mini` (trajectory unlearning)", "from-init": "retraining from the initialisation, same time",
             "finetune": "`finetune`", "original": "the trained model (no unlearning)"}
    rows = ["| removed | model | loss-attack AUC gap | LiRA AUC gap | forget loss / retrain's | test acc (pts) | "
            "time ratio |", "|---:|---|---:|---:|---:|---:|---:|"]
    for ratio, block in d["summary"].items():
        for name, label in shown.items():
            s = block[name]
            tr = s.get("time_ratio")
            rows.append(f"| {float(ratio):.0%} | {label} | {_ci(s['loss_gap'])} | {_ci(s['lira_gap'])} | "
                        f"{s['forget_loss_ratio'][0]:.2f} | {s['test_acc_pts'][0]:+.2f} | "
                        f"{'—' if not tr or tr[0] is None else f'{tr[0]:.3f}'} |")
    rows.append("")
    rows.append(f"Mean over seeds {', '.join(map(str, d['seeds']))} with 95 % intervals; gaps are to the retrained model. From "
                f"`{d['command']}` ([table](experiments/privacy/results/default/table.md)).")
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


TABLES = {"methods": methods_table, "convex": convex_table, "network": network_table, "stream": stream_table}


def render(text: str) -> str:
    for name, make in TABLES.items():
        pat = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pat.search(text):
            raise SystemExit(f"README.md has no <!-- {name}:begin --> ... <!-- {name}:end --> block")
        body = make()
        text = pat.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if README.md's tables differ")
    args = p.parse_args(argv)
    old = README.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("README.md's generated tables are stale: run python docs/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
