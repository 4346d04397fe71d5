"""`mini-unlearn train`: train a model and save a run directory."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ...core.models import BUILTIN_MODELS
from ..runtime import process_wall_s
from .common import (
    HelpFormatter,
    UsageError,
    log,
)


def cmd_train(args) -> int:
    import jax

    from ...core.snapshots import nbytes
    from ...core.training import default_config
    from ...evaluation.metrics import accuracy, predict_probs
    from .. import atomic
    from .. import checkpoint as ck
    from ..data import load_dataset
    from ..recipes import build_problem, keeps_trajectory, unread_test_indices, validation_indices

    out = Path(args.out)
    atomic.check_output_dir(out)  # a new or empty directory only: train never replaces anything
    if not (args.l2 >= 0 and np.isfinite(args.l2)):
        raise UsageError(f"--l2 must be a finite number >= 0, got {args.l2}")
    ds = load_dataset(args.data)
    cfg = default_config(args.model, ds.n_train, seed=args.seed)
    overrides = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size, "snapshots": args.snapshots,
                                   "learning_rate": args.lr, "optimizer": args.optimizer}.items() if v is not None}
    if overrides:
        import dataclasses

        if "optimizer" in overrides and overrides["optimizer"] == "lbfgs":
            overrides.setdefault("batch_size", None)
        cfg = dataclasses.replace(cfg, **overrides)
        if "steps" in overrides and cfg.batch_size is not None and "snapshot_every" not in overrides:
            cfg = dataclasses.replace(cfg, snapshot_every=max(1, cfg.steps // cfg.snapshots))
    # non-convex mini-batch training also keeps a trajectory buffer: `mini` unlearns along it
    with_trajectory = keeps_trajectory(args.model, cfg)
    val_indices = None
    if args.heldout is not None:
        if not with_trajectory:
            raise UsageError("--heldout sets the held-out split of a trajectory run (an MLP or CNN trained with a "
                             "mini-batch optimizer); this run keeps no trajectory buffer and reads no test images. Drop --heldout.")
        n_test = len(ds.y_test)
        if not 2 <= args.heldout <= n_test // 2:
            raise UsageError(f"--heldout must lie in [2, {n_test // 2}] (at most half of the {n_test} test images, so "
                             f"the rest stay for test metrics and attack non-members), got {args.heldout}")
        val_indices = validation_indices(n_test, args.seed, args.heldout)
    log(f"training {args.model} on {args.data}: n={ds.n_train}, {ds.num_classes} classes, l2={args.l2}, "
        f"{cfg.optimizer} {'full batch' if cfg.batch_size is None else f'batch {cfg.batch_size}'}, up to {cfg.steps} steps")
    trained = build_problem(ds, args.model, args.l2, args.seed, hidden=args.hidden, penalize_bias=args.penalize_bias,
                            config=cfg, verbose=True, trajectory=with_trajectory, val_indices=val_indices)
    state, stats, objective = trained.state, trained.problem.stats, trained.problem.objective
    train_s, compile_s = trained.train_s, trained.train_compile_s
    traj_meta = None
    if with_trajectory:
        data = trained.problem.extras["trajectory"]
        schedule = [int(s) for s in np.asarray(data.state.steps)]
        traj_meta = {"schedule": schedule, "val_split": "test", "val_indices": trained.val_indices.tolist(),
                     "profile": [float(v) for v in np.asarray(data.profile)]}
        log(f"trajectory buffer: {len(schedule)} snapshots at steps {schedule}; held-out split: "
            f"{trained.val_indices.size} test images (never MIA non-members)")
    p_train = predict_probs(objective, state.params, ds.x_train)
    # test accuracy on the images unlearning never reads, as `unlearn` reports it (all of them
    # unless the run keeps a held-out split)
    unread = unread_test_indices(len(ds.x_test), trained.val_indices if with_trajectory else [])
    p_test = predict_probs(objective, state.params, ds.x_test[unread])
    param_count = int(sum(a.size for a in jax.tree.leaves(state.params)))
    meta = {
        "kind": "trained",
        "model": args.model, "hidden": args.hidden, "l2": args.l2, "penalize_bias": args.penalize_bias,
        "seed": args.seed,
        "num_classes": ds.num_classes, "input_shape": list(ds.input_shape),
        "data_spec": args.data, "data_fingerprint": ds.fingerprint(), "n_train_original": ds.n_train,
        "n_train": ds.n_train,
        "train_config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "train_time_s": train_s, "compile_s": compile_s, "steps_run": int(state.step),
        "final_grad_norm": float(state.grad_norm),
        "train_acc": accuracy(p_train, ds.y_train), "test_acc": accuracy(p_test, ds.y_test[unread]),
        "n_test": int(unread.size), "param_count": param_count, "param_bytes": nbytes(state.params),
        "snapshot_buffer_bytes": nbytes(state.snapshots), "curvature_stats_bytes": nbytes(stats) if stats is not None else 0,
        "ledger": [], "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if traj_meta is not None:
        meta["trajectory"] = traj_meta
        meta["trajectory_buffer_bytes"] = nbytes(state.trajectory)
    meta["train_wall_s"] = process_wall_s()  # the whole command up to saving
    ck.save_run(out, params=state.params, opt_state=state.opt_state, snapshots=state.snapshots, stats=stats,
                removed=np.zeros((0,), np.int32), meta=meta, objective=objective,
                trajectory=state.trajectory if with_trajectory else None)
    log(f"params {param_count} ({meta['param_bytes']} B), snapshot buffer {meta['snapshot_buffer_bytes']} B "
        f"(K={cfg.snapshots}), curvature stats {meta['curvature_stats_bytes']} B")
    print(f"trained {args.model} on {args.data} (n={ds.n_train}) in {train_s:.1f}s (+{compile_s:.1f}s "
          f"compile): train acc {meta['train_acc']:.4f}, test acc {meta['test_acc']:.4f}"
          f"{f' (the {unread.size} test images outside the held-out split)' if with_trajectory else ''}; command "
          f"{process_wall_s():.1f}s -> {out}")
    return 0


# -- unlearn --------------------------------------------------------------------------------




def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``train`` to the subparsers ``sub``."""
    t = sub.add_parser("train", help="train a model and save a run directory", formatter_class=HelpFormatter)
    t.add_argument("--data", required=True, help="fashion_mnist[:n_train=N,n_test=M] | mnist5k | digits | breast_cancer "
                   "| covtype | npz:PATH | synthetic[:n=,n_test=,d=,classes=,seed=,sep=] | tfds:NAME[:TRAIN;TEST]")
    t.add_argument("--model", required=True, choices=list(BUILTIN_MODELS),
                   help="model family (cnn: the residual CNN of experiments/cnn_benchmark, for square images)")
    t.add_argument("--l2", type=float, default=1e-3, help="L2 penalty on the weights (bias not penalised)")
    t.add_argument("--penalize-bias", action="store_true",
                   help="put the L2 penalty on every parameter, biases too: logistic regression is then "
                        "l2-strongly convex, and `unlearn --certify` gives a guaranteed error bound")
    t.add_argument("--hidden", type=int, default=256, help="hidden width of the MLP (ignored for logreg and cnn)")
    t.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batch order")
    t.add_argument("--out", required=True, help="new (or empty) run directory to write")
    t.add_argument("--steps", type=int, help="override the recipe's number of steps")
    t.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    t.add_argument("--lr", type=float, help="override the recipe's learning rate (adam/sgd)")
    t.add_argument("--optimizer", choices=["lbfgs", "adam", "sgd"], help="override the recipe's optimizer")
    t.add_argument("--snapshots", type=int, help="override the snapshot buffer size K")
    t.add_argument("--heldout", type=int, metavar="N",
                   help="trajectory runs (MLP, CNN): hold out N test images for the rewind rule and the calibration "
                        "(default 500; they are left out of every test metric and never MIA non-members). The "
                        "rule's noise falls as 1/sqrt(N): ~0.013 at 500, as large as its threshold 0.01")
    return t
