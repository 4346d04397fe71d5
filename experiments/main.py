"""The main job: train on Fashion-MNIST, unlearn at several ratios, compare with retraining.

    python experiments/main.py [--data fashion_mnist] [--model logreg] [--ratios 0.01,0.1,0.3,0.5]
                               [--method mini] [--workdir runs/main] [--out experiments/results/main]

It drives the real CLI (`mini-unlearn train` once, then `mini-unlearn unlearn --compare-retrain`
per ratio), prints a comparison table and writes it to OUT/table.md (+ OUT/reports.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path


def cli(*args: str) -> int:
    cmd = [sys.executable, "-m", "mini_unlearn_jax", *args]
    print("$ mini-unlearn " + " ".join(args), file=sys.stderr, flush=True)
    return subprocess.run(cmd).returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion_mnist")
    ap.add_argument("--model", default="logreg")
    ap.add_argument("--l2", default="1e-3")
    ap.add_argument("--ratios", default="0.01,0.1,0.3,0.5")
    ap.add_argument("--method", default="mini")
    ap.add_argument("--seed", default="0")
    ap.add_argument("--workdir", default="runs/main")
    ap.add_argument("--out", default="experiments/results/main")
    args = ap.parse_args()
    work = Path(args.workdir)
    run = work / f"{args.data.replace(':', '_').replace('/', '_')}-{args.model}"
    if not (run / "run.json").exists():
        if run.exists():
            shutil.rmtree(run)
        if cli("train", "--data", args.data, "--model", args.model, "--l2", args.l2, "--seed", args.seed,
               "--out", str(run)) != 0:
            return 1
    rows = []
    for ratio in args.ratios.split(","):
        out = work / f"{run.name}-{args.method}-{ratio}"
        rc = cli("unlearn", "--run", str(run), "--method", args.method, "--ratio", ratio, "--seed", args.seed,
                 "--compare-retrain", "--out", str(out), "--overwrite")
        if rc not in (0, 2):
            return rc
        rows.append(json.loads((out / "report.json").read_text()))
    header = ("| ratio | removed | converged | test acc (retrain / original) | rel param error | "
              "KL test (original's) | KL ratio | time s | retrain s | time ratio |")
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['ratio']:.2f} | {r['n_removed']} | {r['converged']} | {r['test_acc']:.4f} ({r['retrain_test_acc']:.4f} / "
            f"{r['original_test_acc']:.4f}) | {r['rel_param_error']:.3f} | {r['kl_test']:.2e} ({r['original_kl_test']:.2e}) | "
            f"{r['kl_test'] / max(r['original_kl_test'], 1e-30):.3f} | {r['time_s']:.3f} | {r['retrain_time_s']:.2f} | "
            f"{r['time_ratio']:.4f} |")
    import jax

    note = (f"\nCommand: `python experiments/main.py --data {args.data} --model {args.model} --l2 {args.l2} "
            f"--ratios {args.ratios} --method {args.method} --seed {args.seed}`  \n"
            f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, jax {jax.__version__} on "
            f"{jax.devices()[0].platform}; {time.strftime('%Y-%m-%d')}. Times exclude compilation; the time ratio is "
            "unlearning time / retraining time measured in the same run.\n")
    table = "\n".join(lines) + "\n" + note
    print("\n" + table)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "table.md").write_text(f"# {args.method} on {args.data} ({args.model}, l2={args.l2})\n\n" + table)
    (outdir / "reports.json").write_text(json.dumps(rows, indent=2))
    return 0 if all(r["converged"] for r in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
