"""How much of trajectory unlearning's rewind choice is sampling noise in its held-out split.

The rewind rule (mini_unlearn_jax/core/trajectory.py) restarts from the latest snapshot whose
memorisation gap -- mean true-class probability on the training set minus that on a held-out set
-- is at most ``threshold`` (0.01). The held-out set is 500 test images, so the gap carries the
sampling error of a 500-image mean. This measures, on the three MLP settings the project reports
(recipes "leaky-mlp" of experiments/privacy.py and experiments/trajectory.py, "fidelity-mlp" of
experiments/fidelity.py, and experiments/grid.toml's 5,000-image MLP) and seeds 0-2:

- the held-out standard error of the gap at every snapshot (sample s.d. of the true-class
  probabilities over the split / sqrt(500));
- the snapshot the rule picks on the split the project uses (``recipes.validation_indices``: the
  CLI, the harness and privacy.py; for the leaky MLP also trajectory.py's fixed split), on
  ``--splits`` other 500-image splits drawn from the unread test images, and on all of them
  (~9,500 images: the gap with ~4x less noise);
- the same for a confidence-aware variant of the rule, *not the method's*: the latest snapshot
  whose gap plus ``z`` (2, the method's ``noise_z``) standard errors is at most the threshold;
- what the choice changes: on seed 0 at 10 % removal of the leaky and the 10,000-image MLP (the
  knob-setting seed and ratio), trajectory unlearning forced to each early snapshot
  (``rewind_at``) against retraining: test accuracy, forget-set loss ratio and the loss-attack AUC
  (forget set against unread test images).

Diagnostics only: no knob of the method is read from this.

    python experiments/rewind_noise.py [--seeds 0 1 2] [--splits 20] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mini_unlearn_jax.app import recipes
from mini_unlearn_jax.core import methods as M
from mini_unlearn_jax.core import trajectory as TJ
from mini_unlearn_jax.evaluation.attacks import loss_score, roc_metrics
from mini_unlearn_jax.evaluation.metrics import accuracy, predict_probs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trajectory import heldout_split  # noqa: E402  (trajectory.py's fixed split)

THRESHOLD = TJ.TrajectoryConfig().threshold
Z = TJ.TrajectoryConfig().noise_z
SPLIT = 500
# name -> how to train it at a seed (grid.toml's MLP entry, the two named recipes)
SETTINGS = {
    "leaky-mlp": lambda seed: recipes.recipe("leaky-mlp", seed, trajectory=True),
    "fidelity-mlp": lambda seed: recipes.recipe("fidelity-mlp", seed, trajectory=True),
    "grid-mlp": lambda seed: recipes.build_problem("fashion_mnist:n_train=5000", "mlp", 1e-4, seed, hidden=128,
                                                   trajectory=True),
}
SWEEP = ("leaky-mlp", "fidelity-mlp")


def log(msg: str) -> None:
    print(f"[rewind_noise] {msg}", file=sys.stderr, flush=True)


def pick(gaps: np.ndarray, se: np.ndarray | None) -> int:
    """The rule's index on gaps ``[K]``: the latest non-final snapshot with ``gap (+ Z se) <= threshold``."""
    g = gaps if se is None else gaps + Z * se
    ok = np.flatnonzero(g[:-1] <= THRESHOLD)
    return int(ok.max()) if ok.size else 0


def true_class_probs(objective, traj, x, y) -> np.ndarray:
    """``[K, n]``: every snapshot's probability of the true class."""
    return np.asarray(jax.lax.map(lambda p: jnp.exp(-objective.losses(p, x, y)), traj.params))


def one(name: str, seed: int, splits: int) -> tuple[dict, object]:
    tr = SETTINGS[name](seed)
    pb, ds = tr.problem, tr.dataset
    traj = pb.extras["trajectory"].state
    steps = [int(s) for s in np.asarray(traj.steps)]
    p_train = true_class_probs(pb.objective, traj, pb.x, pb.y).mean(1)
    p_test = true_class_probs(pb.objective, traj, jnp.asarray(ds.x_test), jnp.asarray(ds.y_test))

    def on(idx):
        q = p_test[:, idx]
        return p_train - q.mean(1), q.std(1, ddof=1) / np.sqrt(q.shape[1])

    default = np.asarray(tr.val_indices)
    unread = recipes.unread_test_indices(len(ds.x_test), default)
    named = {"default": default}
    if name == "leaky-mlp":
        named["trajectory.py"] = heldout_split(len(ds.x_test))[1]
    row = {"setting": name, "seed": seed, "snapshot_steps": steps, "n_train": int(pb.x.shape[0]), "splits": {}}
    for label, idx in named.items():
        g, se = on(idx)
        row["splits"][label] = {"gaps": g.tolist(), "se": se.tolist(), "pick": steps[pick(g, None)],
                                "pick_confident": steps[pick(g, se)]}
    g_all, se_all = on(unread)
    row["all_unread"] = {"n": int(unread.size), "gaps": g_all.tolist(), "se": se_all.tolist(),
                         "pick": steps[pick(g_all, None)], "pick_confident": steps[pick(g_all, se_all)]}
    rng = np.random.default_rng([seed, 99])
    draws = [rng.choice(unread, SPLIT, replace=False) for _ in range(splits)]
    other = [on(d) for d in draws]
    row["other_splits"] = {"pick": [steps[pick(g, None)] for g, _ in other],
                           "pick_confident": [steps[pick(g, se)] for g, se in other]}
    log(f"{name} seed {seed}: default split picks step {row['splits']['default']['pick']}, all unread "
        f"{row['all_unread']['pick']}, other splits {row['other_splits']['pick']}")
    return row, tr


def sweep(name: str, tr, ratio: float = 0.1) -> list[dict]:
    """Trajectory unlearning forced to each snapshot up to the third-last, at seed 0 (the fidelity
    table's uniform forget set of seed 0), against retraining."""
    pb, ds = tr.problem, tr.dataset
    obj, n = pb.objective, int(pb.x.shape[0])
    forget = np.sort(np.random.default_rng(0).choice(n, max(1, int(round(ratio * n))), replace=False))
    unread = recipes.unread_test_indices(len(ds.x_test), tr.val_indices)
    xt, yt = ds.x_test[unread], ds.y_test[unread]
    xf, yf = np.asarray(pb.x)[forget], np.asarray(pb.y)[forget]

    def measure(w):
        pf, pt = predict_probs(obj, w, xf), predict_probs(obj, w, xt)
        return {"test_acc": accuracy(pt, yt), "forget_loss": float(-np.mean(loss_score(pf, yf))),
                "loss_auc": roc_metrics(loss_score(pf, yf), loss_score(pt, yt))["auc"]}

    ret = measure(M.run_method("retrain", pb, forget).params)
    out = []
    steps = [int(s) for s in np.asarray(pb.extras["trajectory"].state.steps)]
    for s in [None] + steps[:-2]:
        res = M.run_method("mini", pb, forget, **({} if s is None else {"rewind_at": s}))
        m = measure(res.params)
        out.append({"setting": name, "ratio": ratio, "rewind_at": s, "rewind_step": res.info["rewind_step"],
                    "test_acc_pts": 100 * (m["test_acc"] - ret["test_acc"]),
                    "forget_loss_ratio": m["forget_loss"] / ret["forget_loss"],
                    "loss_auc_gap": m["loss_auc"] - ret["loss_auc"], **{f"retrain_{k}": v for k, v in ret.items()}})
        log(f"{name} rewind {out[-1]['rewind_step']}: {out[-1]['test_acc_pts']:+.2f} pts, forget loss "
            f"x{out[-1]['forget_loss_ratio']:.2f}, loss AUC gap {out[-1]['loss_auc_gap']:+.3f}")
    return out


def fmt(v: list[float]) -> str:
    return " ".join(f"{x:.3f}" for x in v)


def table(rows: list[dict], sweeps: list[dict], command: str, wall: float, splits: int) -> str:
    L = ["# The rewind rule's held-out noise", "",
         f"Command: `{command}` (wall {wall:.0f} s). Diagnostics only; no knob is read from this.", "",
         f"The rule rewinds to the latest snapshot whose memorisation gap (training set minus a {SPLIT}-image "
         f"held-out split, mean true-class probability) is at most {THRESHOLD}. *confident* is a variant, not "
         f"the method's: gap + {Z:g} held-out standard errors at most {THRESHOLD}. Picks are snapshot steps; "
         f"'other splits' are {splits} random {SPLIT}-image splits of the unread test images; 'all unread' uses "
         "all of them.", ""]
    for r in rows:
        d, a = r["splits"]["default"], r["all_unread"]
        L += [f"## {r['setting']}, seed {r['seed']} ({r['n_train']} training images)", "",
              f"- snapshots: {r['snapshot_steps']}",
              f"- gap, default split: {fmt(d['gaps'])}",
              f"- its held-out standard error: {fmt(d['se'])}",
              f"- gap on all {a['n']} unread test images: {fmt(a['gaps'])} (s.e. at most {max(a['se']):.3f})"]
        for label, s in r["splits"].items():
            L.append(f"- pick on the {label} split: step {s['pick']} (confident: {s['pick_confident']})")
        L += [f"- pick on all unread: step {a['pick']} (confident: {a['pick_confident']})",
              f"- picks on the other splits: {sorted(r['other_splits']['pick'])}",
              f"- confident picks on the other splits: {sorted(r['other_splits']['pick_confident'])}", ""]
    if sweeps:
        L += ["## What the rewind step changes (seed 0, 10 % removal; `rewind_at` forces the snapshot)", "",
              "| setting | rewind step | test acc - retrain (pts) | forget loss / retrain | loss-attack AUC - retrain |",
              "|---|---:|---:|---:|---:|"]
        for s in sweeps:
            tag = f"{s['rewind_step']} (the rule)" if s["rewind_at"] is None else f"{s['rewind_step']}"
            L.append(f"| {s['setting']} | {tag} | {s['test_acc_pts']:+.2f} | {s['forget_loss_ratio']:.2f} | "
                     f"{s['loss_auc_gap']:+.3f} |")
        L.append("")
    return "\n".join(L)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--splits", type=int, default=20)
    p.add_argument("--no-sweep", action="store_true", help="skip the rewind_at sweep")
    p.add_argument("--out", default="experiments/results/rewind_noise")
    args = p.parse_args()
    t0 = time.perf_counter()
    rows, sweeps = [], []
    for name in args.settings:
        for seed in args.seeds:
            row, tr = one(name, seed, args.splits)
            rows.append(row)
            if seed == 0 and name in SWEEP and not args.no_sweep:
                sweeps += sweep(name, tr)
            del tr
    wall = time.perf_counter() - t0
    command = "python " + " ".join(sys.argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"command": command, "rows": rows, "sweep": sweeps,
                                                  "threshold": THRESHOLD, "z": Z, "wall_s": wall}, indent=2))
    (out / "table.md").write_text(table(rows, sweeps, command, wall, args.splits))
    log(f"wrote {out / 'table.md'} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
