"""`mini-unlearn attack`: membership-inference attacks on an original, retrained and unlearned model."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    UsageError,
    log,
    nonmember_indices,
)
from .unlearn import load_problem


def add_attack_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``attack`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    a = subparsers.add_parser(
        "attack", help="membership-inference attacks on an original, retrained and unlearned model",
        description="Attack the original run, a model retrained without the forget set, and an unlearned run "
                    "(from `mini-unlearn unlearn`) with threshold, learned and LiRA attacks; members are the "
                    "forget set, non-members held-out test examples. Writes OUT/report.json and OUT/roc.png.")
    a.add_argument("--run", required=True, help="the run the unlearned model was derived from")
    a.add_argument("--unlearned", required=True, help="an output directory of `mini-unlearn unlearn`")
    a.add_argument("--shadows", type=int, default=16, help="number of LiRA shadow models (default 16)")
    a.add_argument("--shadow-steps", type=int, help="shadow training steps (default: the run's recipe)")
    a.add_argument("--shadow-pool", choices=["all", "forget-heldout"], default="all",
                   help="shadows train on random halves of the forget + held-out examples plus the retained "
                        "training data ('all', default) or of the forget + held-out examples only")
    a.add_argument("--seed", type=int, default=0, help="seed of the shadow models and of the member/non-member subsampling (default 0)")
    a.add_argument("--out", required=True, help="new directory for report.json and roc.png")
    a.set_defaults(func=cmd_attack)
    return a


MAX_EXTRA_POOL = 20000  # retained examples added to the shadow pool at most (subsampled beyond)


def _write_dir_atomic(out: Path, report_text: str, curves: dict[str, tuple[Any, Any]], title: str) -> None:
    """report.json and roc.png, written by the project's one atomic directory writer (marker kind "attack")."""
    from ...evaluation import attacks as A
    from .. import atomic

    def fill(tmp: Path) -> None:
        A.plot_roc(curves, tmp / "roc.png", title=title)
        (tmp / "report.json").write_text(report_text)

    try:
        atomic.write_dir_atomic(out, fill, kind="attack")  # never replaces anything (attack has no --overwrite)
    except atomic.OutputExistsError as e:
        raise UsageError(str(e)) from e


def cmd_attack(args: argparse.Namespace) -> int:
    """``mini-unlearn attack``: full MIA suite on original / retrained / unlearned; returns 0.

    Raises ``cli.UsageError`` (or ``CheckpointError`` / ``DataError``) on bad input, before
    anything is written.
    """
    from ...core import methods as M
    from ...core import registry as R
    from ...evaluation.privacy import (
        PLOT_ATTACKS,
        full_suite,
        shadow_recipe,
        summarize,
    )
    from .. import atomic
    from .. import checkpoint as ck

    t_start = time.perf_counter()
    out = Path(args.out)
    try:
        atomic.check_output_dir(out)  # a new or empty directory only: attack results never replace anything
    except atomic.OutputExistsError as e:
        raise UsageError(str(e)) from e
    if args.shadows < 2:
        raise UsageError(f"--shadows must be at least 2 (LiRA wants 16 or more), got {args.shadows}")
    if args.shadow_steps is not None and args.shadow_steps < 1:
        raise UsageError(f"--shadow-steps must be positive, got {args.shadow_steps}")
    run_dir, unl_dir = Path(args.run).absolute(), Path(args.unlearned).absolute()
    for d, what in ((run_dir, "--run"), (unl_dir, "--unlearned")):
        if out.absolute() == d or d in out.absolute().parents:
            raise UsageError(f"--out must not be the {what} directory or inside it")
    run, unl = ck.load_run(run_dir), ck.load_run(unl_dir)
    meta, umeta = run.meta, unl.meta
    if umeta.get("kind") != "unlearned":
        raise UsageError(f"{unl_dir} is not an unlearned run (kind {umeta.get('kind')!r}); give the --out of "
                         "`mini-unlearn unlearn` as --unlearned")
    for key in ("data_fingerprint", "model", "hidden", "l2", "num_classes"):
        if meta.get(key) != umeta.get(key):
            raise UsageError(f"{unl_dir} was not derived from {run_dir}: {key} differs "
                             f"({umeta.get(key)!r} vs {meta.get(key)!r})")
    if np.setdiff1d(run.removed, unl.removed).size:
        raise UsageError(f"{run_dir} has removed examples that {unl_dir} still holds; it is not its ancestor")
    forget = np.setdiff1d(unl.removed, run.removed).astype(np.int32)
    if forget.size == 0:
        raise UsageError(f"{unl_dir} removed nothing beyond {run_dir}: there is no forget set to attack")
    report_path = unl_dir / "report.json"
    ureport = json.loads(report_path.read_text()) if report_path.exists() else {}
    method = ureport.get("method") or (umeta.get("ledger") or [{}])[-1].get("method", "unknown")
    if ureport.get("run") and Path(ureport["run"]).absolute() != run_dir:
        log(f"note: {unl_dir} was unlearned from {ureport['run']}; attacking the removals since {run_dir}")
    ds, alive, x, y, problem = load_problem(run)
    local = np.searchsorted(alive, forget).astype(np.int32)
    cfg = run.train_config
    original = run.params
    own = R.get_method(method).own_reference if method in R.METHODS else None
    if own is not None:  # a method that trains its own original: its recipe on all data and without the forget set
        options = (ureport.get("details") or {}).get("config") or {}
        log(f"{method}: its reference is its own recipe; training it on all data and without the forget set ...")
        original = own(problem, np.zeros(0, np.int32), **options).params
        ref = own(problem, local, **options)
        reference = f"{own.__name__} ({method}'s own recipe without the forget set)"
    else:
        truth = R.ground_truth_method()
        log(f"retraining on the remaining {alive.size - forget.size} examples for reference ...")
        ref = R.run_method(truth, problem, local)
        reference = f"{truth} (the run's recipe without the forget set)"
    if not ref.converged:
        raise UsageError(f"the reference retraining failed: {ref.reason}")

    keep = M.keep_mask(alive.size, local).astype(bool)
    x_extra = y_extra = None
    if args.shadow_pool == "all":
        kept = np.flatnonzero(keep)
        if kept.size > MAX_EXTRA_POOL:
            kept = np.sort(np.random.default_rng(args.seed).choice(kept, MAX_EXTRA_POOL, replace=False))
        x_extra, y_extra = x[kept], y[kept]
    # the shadows imitate the recipe that trained the three targets (a method's own, where it has one)
    recipe = shadow_recipe(ref.info.get("train_config", cfg), args.shadow_steps)
    log(f"attacking with {args.shadows} shadow models ({recipe.optimizer_name}, {recipe.steps} steps, "
         f"{'full batch' if recipe.batch_size is None else f'batch {recipe.batch_size}'}) ...")

    def init_fn(key):
        return run.model.init(key, x[:1])["params"]

    params_by_name = {"original": original, "retrain": ref.params, "unlearned": unl.params}
    nonmembers = nonmember_indices(meta, len(ds.x_test))
    suite, curves = full_suite(run.objective, params_by_name, x[local], y[local], ds.x_test[nonmembers],
                               ds.y_test[nonmembers],
                               init_params_fn=init_fn, recipe=recipe, num_shadows=args.shadows,
                               x_extra=x_extra, y_extra=y_extra, seed=args.seed)
    summary = summarize(suite)
    report = {
        "run": str(run_dir), "unlearned": str(unl_dir), "method": method, "data_spec": meta["data_spec"],
        "n_train": int(alive.size), "n_forget": int(forget.size), "ratio": float(forget.size / alive.size),
        "reference": reference, "seed": args.seed, "shadow_pool": args.shadow_pool,
        "members": "forget set", "nonmembers": "test examples (subsampled to the forget set's size)",
        "summary_auc": summary, **suite, "time_s": time.perf_counter() - t_start,
    }
    plot = {f"{name} / {att}": curves[name][att] for name in params_by_name for att in PLOT_ATTACKS}
    text = json.dumps(report, indent=2, default=float)
    _write_dir_atomic(out, text, plot, title=f"MIA on the forget set: {method}")
    for att, row in summary.items():
        log(f"{att:12s} AUC original {row['original']:.3f}  retrain {row['retrain']:.3f}  "
             f"unlearned {row['unlearned']:.3f}  (gap to retrain {row['unlearned_gap_to_retrain']:+.3f})")
    log(f"report.json and roc.png written to {out}")
    print(json.dumps({"summary_auc": summary, "out": str(out)}, indent=2, default=float))
    return 0


# -- info -----------------------------------------------------------------------------------


