"""Membership inference on the forget set in a leaky setting (method.md section 5).

An MLP (784-256-10, l2 1e-5) trained with Adam to ~100% train accuracy on the first 2,000
Fashion-MNIST training images leaks membership. At removal ratios 10% and 30% every method
unlearns a random forget set, and the loss-threshold attack and LiRA (online, Carlini et
al. 2022) attack the forget set (members) against held-out test images (non-members, the same
count). The target for a method is the retrained model's value, not 0.5.

- Shadows: one set of ``--shadows`` MLPs trained in a single vmapped call, with the target's
  recipe, on random halves of a pool of all 2,000 training images + 600 held-out test images;
  every pool example is IN for exactly half of them, so the same shadows serve both ratios.
- DeltaGrad replays its own SGD trajectory (lr 0.3, same batch size and steps), so it is
  attacked next to its own original and its own retrain, with a second shadow set trained by
  that SGD recipe.
- Gaps to the retrained model come with a 95% paired bootstrap interval (members and
  non-members resampled, the same draws for both models).

    python experiments/privacy.py                 # writes experiments/results/privacy/
    python experiments/privacy.py --quick --out /tmp/privacy-smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mini_unlearn_jax.app import recipes
from mini_unlearn_jax.core import methods as M
from mini_unlearn_jax.evaluation import attacks as A
from mini_unlearn_jax.evaluation import privacy as P
from mini_unlearn_jax.evaluation.metrics import accuracy, predict_probs

RECIPE = "leaky-mlp"  # the setting (data, model, l2, Adam recipe): mini_unlearn_jax/app/recipes.py
METHODS = ("mini", "mini-lite", "mini-plus", "newton", "finetune", "neggrad")
ATTACKS = ("loss", "lira_online")
ATTACK_LABEL = {"loss": "loss", "lira_online": "LiRA online"}
TOL = 0.02
BROKEN_DROP = 0.05  # test accuracy this far below retrain's marks a destroyed model


def log(msg: str) -> None:
    print(f"[privacy] {msg}", file=sys.stderr, flush=True)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # left out, the six below are the recipe's (filled in from the trained problem)
    p.add_argument("--n-train", type=int, help=f"first N Fashion-MNIST training images (default: {RECIPE}'s)")
    p.add_argument("--hidden", type=int, help=f"MLP width (default: {RECIPE}'s)")
    p.add_argument("--l2", type=float, help=f"l2 penalty (default: {RECIPE}'s)")
    p.add_argument("--steps", type=int, help=f"Adam steps (default: {RECIPE}'s)")
    p.add_argument("--batch-size", type=int, help=f"Adam batch size (default: {RECIPE}'s)")
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default: {RECIPE}'s)")
    p.add_argument("--dg-lr", type=float, default=0.3, help="DeltaGrad's SGD learning rate")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--n-heldout", type=int, default=600, help="held-out test images in the shadow pool")
    p.add_argument("--shadows", type=int, default=32)
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples for the gap intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (n=400, 200 steps, 4 shadows, 10%%)")
    p.add_argument("--out", default="experiments/results/privacy")
    a = p.parse_args()
    if a.quick:
        a.n_train, a.steps, a.shadows, a.ratios, a.n_heldout, a.boot = 400, 200, 4, [0.1], 100, 200
    return a


def train(args: argparse.Namespace) -> recipes.Trained:
    """The recipe with the given arguments replacing its values; fills the others into ``args``."""
    given = {"hidden": args.hidden, "l2": args.l2, "steps": args.steps, "batch_size": args.batch_size,
             "learning_rate": args.lr}
    data = None if args.n_train is None else f"fashion_mnist:n_train={args.n_train}"
    tr = recipes.recipe(RECIPE, args.seed, data=data, **{k: v for k, v in given.items() if v is not None})
    cfg = tr.problem.recipe
    args.n_train, args.hidden, args.l2 = tr.dataset.n_train, tr.model.hidden, tr.problem.objective.l2
    args.steps, args.batch_size, args.lr = cfg.steps, cfg.batch_size, cfg.learning_rate
    return tr


def model_stats(objective, params, ds, x, y, forget) -> dict:
    keep = np.ones(len(x), bool)
    keep[forget] = False
    return {
        "test_acc": accuracy(predict_probs(objective, params, ds.x_test), ds.y_test),
        "forget_acc": accuracy(predict_probs(objective, params, x[forget]), y[forget]),
        "retain_acc": accuracy(predict_probs(objective, params, x[keep]), y[keep]),
    }


def attack_block(objective, models, x, y, forget, x_held, y_held, shadows, args, reference):
    """Full suite with the shared shadows; gaps to ``reference`` with paired bootstrap CIs."""
    sset, n_train = shadows
    rep, curves, scores = P.full_suite(
        objective, models, x[forget], y[forget], x_held, y_held,
        shadows=(sset.take(forget), sset.take(n_train + np.arange(len(x_held)))),
        seed=args.seed, return_scores=True)
    gaps = {}
    for name in models:
        if name == reference:
            continue
        gaps[name] = {att: P.paired_auc_gap(scores[name][att], scores[reference][att], n_boot=args.boot,
                                            seed=args.seed) for att in ATTACKS}
    return rep, curves, gaps


def fmt(v: float, nd: int = 3) -> str:
    return f"{v:.{nd}f}"


def table(results: dict, args: argparse.Namespace, command: str) -> str:
    s = results["setting"]
    lines = [
        "# Membership inference on the forget set (leaky MLP, Fashion-MNIST)",
        "",
        f"Command: `{command}`",
        "",
        f"Setting: MLP 784-{args.hidden}-10, l2 {args.l2}, Adam lr {args.lr}, batch {args.batch_size}, "
        f"{args.steps} steps on the first {args.n_train} Fashion-MNIST training images: train accuracy "
        f"{fmt(s['train_acc'], 4)}, test accuracy {fmt(s['test_acc'], 4)}. Members = the forget set, "
        "non-members = as many held-out test images (from a fixed pool of "
        f"{args.n_heldout}). LiRA: {args.shadows} shadow MLPs trained in one vmapped call with the target's "
        f"recipe on random halves of the {args.n_train} training + {args.n_heldout} held-out images (each "
        f"example IN for exactly {args.shadows // 2}); global-variance Gaussian fits. DeltaGrad (SGD lr "
        f"{args.dg_lr}, same batches and steps) is compared with its own SGD original and retrain, "
        "attacked with a second shadow set trained by that SGD recipe.",
        "",
        "AUC = ROC AUC (±: Hanley-McNeil standard error), adv = max |TPR - FPR|, TPR@1% = TPR at 1% FPR. "
        "Gap = method AUC - reference AUC (reference: retrain; deltagrad: its own retrain) with a 95% "
        f"paired bootstrap interval ({args.boot} resamples). 'within {TOL}': |gap| <= {TOL}. A model whose "
        f"test accuracy is more than {BROKEN_DROP:.0%} below the retrained model's is marked broken: its AUC "
        "can sit near the reference only because it no longer fits anything.",
        "",
    ]
    for rkey, r in results["ratios"].items():
        lines += [f"## Removal ratio {float(rkey):.0%} ({r['n_forget']} forget examples vs "
                  f"{r['n_members']} members / {r['n_nonmembers']} non-members)", ""]
        head = "| model | test acc | forget acc |"
        sep = "|---|---:|---:|"
        for att in ATTACKS:
            lab = ATTACK_LABEL[att]
            head += f" {lab} AUC | {lab} adv | {lab} TPR@1% | {lab} gap [95% CI] |"
            sep += "---:|---:|---:|---:|"
        lines += [head, sep]
        for name, row in r["models"].items():
            line = f"| {name} | {fmt(row['test_acc'])} | {fmt(row['forget_acc'])} |"
            for att in ATTACKS:
                m = row["attacks"][att]
                g = row["gaps"].get(att)
                gap = "—" if g is None else f"{g['gap']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]"
                line += (f" {fmt(m['auc'])} ± {fmt(m['auc_se'])} | {fmt(m['advantage'])} | "
                         f"{fmt(m['tpr_at_1pct_fpr'])} | {gap} |")
            lines.append(line)
        lines.append("")
    lines += ["## Is mini within 0.02 AUC of the retrained model?", ""]
    for rkey, r in results["ratios"].items():
        for att in ATTACKS:
            g = r["models"]["mini"]["gaps"][att]
            ok = abs(g["gap"]) <= TOL
            closer = sorted(
                (abs(row["gaps"][att]["gap"]), n) for n, row in r["models"].items()
                if att in row.get("gaps", {}) and n not in ("original", "deltagrad-original")
            )
            ref_acc = r["models"]["retrain"]["test_acc"]
            broken = {n for n, row in r["models"].items() if row["test_acc"] < ref_acc - BROKEN_DROP}
            rank = ", ".join(f"{n} {v:.3f}" + (" (broken model: test acc "
                                                 f"{r['models'][n]['test_acc']:.3f})" if n in broken else "")
                             for v, n in closer)
            verdict = f"within {TOL}" if ok else f"NOT within {TOL} (by {abs(g['gap']) - TOL:.3f})"
            lines.append(f"- {float(rkey):.0%}, {ATTACK_LABEL[att]}: mini gap {g['gap']:+.3f} "
                         f"[{g['lo']:+.3f}, {g['hi']:+.3f}] -> {verdict}; |gap| by method: {rank}.")
    lines += ["", f"Wall time {results['wall_s']:.0f} s on {results['machine']}.", ""]
    return "\n".join(lines)


def main() -> int:
    args = parse()
    command = "python " + " ".join(sys.argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    log(f"training the MLP ({RECIPE} recipe) ...")
    tr = train(args)
    problem, ds, model, objective, cfg = tr.problem, tr.dataset, tr.model, tr.problem.objective, tr.problem.recipe
    log(f"  {args.steps} Adam steps on {args.n_train} images")
    x, y = ds.x_train, ds.y_train
    w_star = problem.params
    setting = {"train_acc": accuracy(predict_probs(objective, w_star, x), y),
               "test_acc": accuracy(predict_probs(objective, w_star, ds.x_test), ds.y_test)}
    log(f"train acc {setting['train_acc']:.4f}, test acc {setting['test_acc']:.4f}")
    dg_cfg = M.deltagrad_config(problem, lr=args.dg_lr)

    rng = np.random.default_rng(args.seed)
    held = np.sort(rng.choice(len(ds.x_test), size=args.n_heldout, replace=False))
    x_held, y_held = ds.x_test[held], ds.y_test[held]
    pool_x, pool_y = np.concatenate([x, x_held]), np.concatenate([y, y_held])

    def init_fn(key):
        return model.init(key, jnp.asarray(x[:1]))["params"]

    shadow_sets = {}
    for kind, recipe in (("adam", P.shadow_recipe(cfg)),
                         ("sgd", P.ShadowRecipe(dg_cfg.steps, dg_cfg.lr, dg_cfg.batch_size, "sgd"))):
        log(f"training {args.shadows} {kind} shadows ({recipe.steps} steps) on a pool of {len(pool_x)} ...")
        sset, secs = P.train_shadow_set(objective, init_fn, pool_x, pool_y, num_shadows=args.shadows,
                                        recipe=recipe, seed=args.seed + 1)
        shadow_sets[kind] = (sset, len(x))
        setting[f"shadows_{kind}"] = {"train_s": secs, **recipe.as_dict()}
        log(f"  {secs:.0f}s")

    results = {"setting": setting, "args": vars(args), "command": command, "ratios": {}}
    roc_curves = {}
    for ratio in args.ratios:
        r = int(round(ratio * len(x)))
        forget = np.sort(np.random.default_rng([args.seed, r]).choice(len(x), size=r, replace=False))
        log(f"ratio {ratio:.0%}: removing {r} examples")
        outs, info = {}, {}
        for name in ("retrain",) + METHODS:
            res = M.run_method(name, problem, forget)
            outs[name] = res.params
            info[name] = {"converged": res.converged, "reason": res.reason, "time_s": res.time_s,
                          "compile_s": res.compile_s}
            log(f"  {name}: {res.reason}, {res.time_s:.2f}s (+{res.compile_s:.1f}s compile)")
        res = M.run_method("deltagrad", problem, forget, lr=args.dg_lr)
        dg_ref = M.deltagrad_retrain(problem, forget, **dataclasses.asdict(dg_cfg))
        info["deltagrad"] = {"converged": res.converged, "reason": res.reason, "time_s": res.time_s,
                             "compile_s": res.compile_s, "train_s": res.info["train_s"]}
        info["deltagrad-retrain"] = {"time_s": dg_ref.time_s, "compile_s": dg_ref.compile_s}
        log(f"  deltagrad: {res.reason}, {res.time_s:.2f}s; its retrain {dg_ref.time_s:.2f}s")

        main_models = {"original": w_star, "retrain": outs["retrain"], **{m: outs[m] for m in METHODS}}
        rep, curves, gaps = attack_block(objective, main_models, x, y, forget, x_held, y_held,
                                         shadow_sets["adam"], args, "retrain")
        dg_models = {"deltagrad-original": res.info["own_original"], "deltagrad-retrain": dg_ref.params,
                     "deltagrad": res.params}
        rep_dg, curves_dg, gaps_dg = attack_block(objective, dg_models, x, y, forget, x_held, y_held,
                                                  shadow_sets["sgd"], args, "deltagrad-retrain")
        rows = {}
        for name, params in {**main_models, **dg_models}.items():
            attacks = rep["models"].get(name) or rep_dg["models"][name]
            rows[name] = {**model_stats(objective, params, ds, x, y, forget), "attacks": attacks,
                          "gaps": gaps.get(name, gaps_dg.get(name, {})), **info.get(name, {})}
        results["ratios"][str(ratio)] = {"n_forget": r, "n_members": rep["n_members"],
                                         "n_nonmembers": rep["n_nonmembers"], "models": rows}
        roc_curves[ratio] = {**curves, **curves_dg}
        for att in ATTACKS:
            log(f"  {att}: " + ", ".join(f"{n} {rows[n]['attacks'][att]['auc']:.3f}" for n in rows))

    results["wall_s"] = time.perf_counter() - t_start
    results["machine"] = f"{platform.machine()} CPU, jax {jax.__version__}, {jax.devices()[0].platform}"
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "table.md").write_text(table(results, args, command))
    shown = ("original", "retrain", "mini", "mini-plus", "newton", "finetune", "neggrad", "deltagrad")
    for i, (ratio, curves) in enumerate(roc_curves.items()):
        for att in ATTACKS:
            name = "roc.png" if (i == 0 and att == "lira_online") else f"roc_{att}_{int(round(ratio * 100))}pct.png"
            A.plot_roc({n: curves[n][att] for n in shown}, out / name,
                       title=f"{ATTACK_LABEL[att]} on the forget set, {ratio:.0%} removed")
    log(f"done in {results['wall_s']:.0f}s -> {out}")
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
