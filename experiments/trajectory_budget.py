"""How trajectory unlearning's retraining budget trades test accuracy for time on the 10,000-image
MLP, and the sweep the method's default budget is read from.

On experiments/fidelity.toml's MLP (recipes "fidelity-mlp": 10,000 Fashion-MNIST images, Adam, 30
epochs, trajectory buffer), this sweeps the retraining budget (a fraction of the recipe's steps)
at a few removal ratios, side by side with retraining, and records the snapshot the rewind rule
chose. ``TrajectoryConfig.budget`` is the smallest budget whose test accuracy at 10 % removal
(seed 0) is not below retraining's; the other ratios show how that choice carries over.

    python experiments/trajectory_budget.py [--budgets ...] [--ratios ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from mini_unlearn_jax.app import recipes
from mini_unlearn_jax.core import methods as M
from mini_unlearn_jax.core import trajectory as TJ
from mini_unlearn_jax.evaluation.metrics import accuracy, predict_probs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.075, 0.1, 0.125, 0.15])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.1, 0.5])
    p.add_argument("--out", default="experiments/results/trajectory_budget")
    args = p.parse_args()
    t0 = time.perf_counter()
    tr = recipes.recipe("fidelity-mlp", 0, trajectory=True)
    pb, ds = tr.problem, tr.dataset
    n = int(pb.x.shape[0])
    acc = lambda w: accuracy(predict_probs(pb.objective, w, ds.x_test), ds.y_test)
    rows = []
    for ratio in args.ratios:
        # the harness's uniform forget set for seed 0 (the fidelity table's)
        forget = np.sort(np.random.default_rng(0).choice(n, max(1, int(round(ratio * n))), replace=False))
        ret = M.run_method("retrain", pb, forget)
        ret_acc = acc(ret.params)
        for b in args.budgets:
            res = M.run_method("mini", pb, forget, budget=b)
            rows.append({"ratio": ratio, "budget": b, "converged": res.converged, "test_acc": acc(res.params),
                         "retrain_test_acc": ret_acc, "rewind_step": res.info["rewind_step"],
                         "steps": res.info["steps"], "time_ratio": res.time_s / max(ret.time_s, 1e-9)})
            print(f"[trajectory_budget] {ratio:.0%} budget {b}: test acc {rows[-1]['test_acc']:.4f} "
                  f"(retrain {ret_acc:.4f}), rewind step {rows[-1]['rewind_step']}", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(sys.argv)
    (out / "results.json").write_text(json.dumps({"command": command, "rows": rows,
                                                  "wall_s": time.perf_counter() - t0}, indent=2, default=float))
    at10 = [r for r in rows if r["ratio"] == 0.1]
    ok = [r["budget"] for r in at10 if r["test_acc"] >= r["retrain_test_acc"]]
    pick = (f"the smallest budget whose test accuracy at 10 % removal is not below retraining's: {min(ok)}"
            if ok else "no budget of the sweep reaches retraining's test accuracy at 10 % removal" if at10
            else "no 10 % row: the rule has nothing to read")
    lines = ["# Trajectory unlearning's retraining budget on the 10,000-image MLP", "",
             f"Command: `{command}` (wall {time.perf_counter() - t0:.0f} s). The rule for the method's default "
             f"budget (TrajectoryConfig.budget = {TJ.TrajectoryConfig().budget}): {pick}.", "",
             "| removed | budget | rewind step | retraining steps | test acc - retrain (pts) | time ratio |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['ratio']:.0%} | {r['budget']} | {r['rewind_step']} | {r['steps']} | "
                     f"{100 * (r['test_acc'] - r['retrain_test_acc']):+.2f} | {r['time_ratio']:.3f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
