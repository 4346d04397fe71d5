"""The ``mini-unlearn`` command line: train, unlearn, info, attack, audit.

    mini-unlearn train --data SPEC --model {logreg,mlp} [--l2 FLOAT] [--penalize-bias] [--hidden INT] [--seed INT]
                       [--heldout N] --out RUN_DIR
    mini-unlearn unlearn --run RUN_DIR [--method mini] (--ratio FLOAT | --forget FILE) [--seed INT] [--budget F]
                         [--compare-retrain] [--mia] [--certify] --out OUT_DIR [--export-probs FILE.npz]
                         [--overwrite] [--json] [--retire-source]
    mini-unlearn info RUN_DIR [--indices]
    mini-unlearn retire RUN_DIR --successor OUT_DIR [--reason TEXT]   (delete RUN_DIR's model, keep its ledger)
    mini-unlearn attack --run RUN_DIR --unlearned OUT_DIR --out ATTACK_DIR   (full MIA suite incl. LiRA)
    mini-unlearn audit RUN_DIR --forget FILE [--tolerance 0.03] [--json]    (writes nothing)

Exit codes: 0 success, 1 bad input or a refused retire (message on stderr, nothing written or
deleted; after `unlearn --retire-source` the message says the result was written), 2 the method did not
converge (report.json says why; no model is saved), 3 audit FAIL (a stored artefact of the run
remembers the forget set better than its model does), 130 interrupted (nothing written).
Each command prints one summary line on stdout (audit: a table of its rows, then the verdict
line); progress goes to stderr. report.json's fields
are documented in docs/cli.md ("What report.json holds").
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .runtime import process_wall_s

EXIT_BAD_INPUT, EXIT_NOT_CONVERGED, EXIT_AUDIT_FAIL, EXIT_INTERRUPTED = 1, 2, 3, 130



def log(msg: str) -> None:
    print(f"[mini-unlearn] {msg}", file=sys.stderr, flush=True)


class UsageError(Exception):
    pass


# -- train ----------------------------------------------------------------------------------


def nonmember_indices(meta: dict, n_test: int) -> np.ndarray:
    """The test images the unlearning method never reads -- all but a trajectory run's held-out
    split: the test metrics of ``unlearn`` and an attack's non-members are computed on these."""
    from .recipes import unread_test_indices

    return unread_test_indices(n_test, (meta.get("trajectory") or {}).get("val_indices", []))


def cmd_train(args) -> int:
    import jax

    from ..core.snapshots import nbytes
    from ..core.training import default_config
    from ..evaluation.metrics import accuracy, predict_probs
    from . import atomic
    from . import checkpoint as ck
    from .data import load_dataset
    from .recipes import build_problem, keeps_trajectory, unread_test_indices, validation_indices

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
            raise UsageError("--heldout sets the held-out split of a trajectory run (an MLP trained with a mini-batch "
                             "optimizer); this run keeps no trajectory buffer and reads no test images. Drop --heldout.")
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


def read_forget_file(path: Path) -> np.ndarray:
    """Indices from ``--forget``: a ``.npy`` integer array, or a text file with one integer per
    line (a one-column CSV; a non-numeric first line is taken as a header). Integers only: a
    float such as ``1.0`` is refused like ``1.5``, so a file means what it says."""
    if not path.is_file():
        raise UsageError(f"--forget {path} not found: give a .npy file or a text file of training indices, one per line")
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        try:
            idx = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise UsageError(f"--forget {path} holds pickled objects, which are never loaded; save a plain integer "
                             "array with np.save(path, np.asarray(indices, dtype=np.int64))") from e
        except Exception as e:
            raise UsageError(f"--forget {path} is not a readable .npy array ({e}); save it with "
                             "np.save(path, np.asarray(indices, dtype=np.int64))") from e
        if idx.dtype.kind not in "iu":
            raise UsageError(f"--forget {path} holds {idx.dtype} values; indices must be saved as integers "
                             "(np.save(path, np.asarray(indices, dtype=np.int64)))")
        return idx
    try:
        lines = [ln.strip().rstrip(",") for ln in path.read_text().splitlines()]
    except UnicodeDecodeError as e:
        raise UsageError(f"--forget {path} is neither a .npy array nor a text file of indices") from e
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if lines and not lines[0].lstrip("+-").isdigit() and not _looks_numeric(lines[0]):
        lines = lines[1:]  # a header such as "index"
    bad = [(i, ln) for i, ln in enumerate(lines) if not ln.lstrip("+-").isdigit()]
    if bad:
        i, ln = bad[0]
        raise UsageError(f"--forget {path}: entry {i + 1} is {ln!r}; give one integer index per line "
                         f"({len(bad)} entries are not integers)")
    return np.asarray([int(ln) for ln in lines], dtype=np.int64)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def check_ratio_args(args) -> None:
    """The checks that need neither the run nor the data (run before anything is loaded)."""
    if (args.ratio is None) == (args.forget is None):
        raise UsageError("give exactly one of --ratio FLOAT or --forget FILE (.npy, or text with one index per line)")
    if args.ratio is not None and not (0.0 < args.ratio < 1.0):
        raise UsageError(f"--ratio must lie strictly between 0 and 1, got {args.ratio}")


def load_forget(args, n_original: int, removed: np.ndarray, from_file: np.ndarray | None) -> np.ndarray:
    from ..core.mini import validate_indices

    alive = np.setdiff1d(np.arange(n_original), removed)
    if args.ratio is not None:
        r = int(round(args.ratio * alive.size))
        if r < 1:
            raise UsageError(f"--ratio {args.ratio} of {alive.size} examples removes nothing; use a larger ratio")
        if r >= alive.size:
            raise UsageError(f"--ratio {args.ratio} would remove every remaining example")
        rng = np.random.default_rng(args.seed)
        return np.sort(rng.choice(alive, size=r, replace=False)).astype(np.int32)
    try:
        idx = validate_indices(from_file, n_original)
    except ValueError as e:
        raise UsageError(f"--forget {args.forget}: {e}") from e
    again = np.intersect1d(idx, removed)
    if again.size:
        raise UsageError(f"--forget {args.forget}: {again.size} indices were already removed by an earlier request "
                         f"(e.g. {again[:5].tolist()}); see `mini-unlearn info {args.run}` and drop them")
    if idx.size >= alive.size:
        raise UsageError("the forget set covers every remaining example; nothing would remain to learn from")
    return idx


def load_problem(run):
    """The dataset behind ``run`` (checked against its fingerprint), the indices still alive, the
    remaining data and the :class:`Problem` (the run's objective, recipe and buffer) -- the load
    step shared by ``unlearn`` and ``attack``."""
    from .data import load_dataset

    meta = run.meta
    ds = load_dataset(meta["data_spec"])
    if ds.fingerprint() != meta["data_fingerprint"]:
        raise UsageError(f"the data behind {meta['data_spec']!r} differs from what this run was trained on "
                         "(fingerprint mismatch); restore the original data or retrain on the new data")
    alive = np.setdiff1d(np.arange(ds.n_train), run.removed)
    val = None
    if run.trajectory is not None:
        vi = np.asarray(meta["trajectory"]["val_indices"], np.int64)
        val = (ds.x_test[vi], ds.y_test[vi])
    problem = run.problem(ds.x_train[alive], ds.y_train[alive], val=val)
    x, y = problem.x, problem.y
    return ds, alive, x, y, problem


def cmd_unlearn(args) -> int:
    from ..core import methods as M
    from ..core import registry as R
    from . import atomic
    from . import checkpoint as ck

    # every check that needs neither the run nor the data comes first (loading takes seconds)
    if args.method not in R.METHODS:
        raise UsageError(f"unknown --method {args.method!r}: choose one of {', '.join(R.METHODS)}")
    check_ratio_args(args)
    if args.budget is not None and not 0 < args.budget <= 1:
        raise UsageError(f"--budget is a fraction of the training recipe's steps, in (0, 1]; got {args.budget} "
                         "(1 costs as many steps as retraining)")
    from_file = read_forget_file(Path(args.forget)) if args.forget is not None else None
    out = Path(args.out)
    run_dir = Path(args.run).absolute()
    if out.absolute() == run_dir or run_dir in out.absolute().parents:
        raise UsageError("--out must not be the run directory or inside it: the trained run is never modified")
    atomic.check_output_dir(out, overwrite=args.overwrite)  # --overwrite replaces only a result of ours, nothing else
    probs_file = Path(args.export_probs) if args.export_probs else None
    if probs_file is not None:
        atomic.check_output_file(probs_file, overwrite=args.overwrite)
    meta0 = ck.read_meta(run_dir)  # a missing or foreign run directory fails here, before anything heavy
    if args.retire_source:  # a run that retire would refuse is refused now, before any work
        from .retire import check_retirable

        check_retirable(run_dir)
    if args.budget is not None and not meta0.get("trajectory"):
        raise UsageError("--budget sets trajectory unlearning's retraining budget, and this run keeps no "
                         "trajectory buffer (only `train --model mlp` with a mini-batch optimizer does), so "
                         f"--method {args.method} is not trajectory unlearning here. Drop --budget.")

    from ..core.snapshots import nbytes
    from ..evaluation import metrics as mt
    from ..evaluation.compare import compare, evaluate

    t_load = time.perf_counter()
    run = ck.load_run(run_dir)
    meta = run.meta
    ds, alive, x, y, problem = load_problem(run)
    n_original = ds.n_train
    forget = load_forget(args, n_original, run.removed, from_file)
    local = np.searchsorted(alive, forget).astype(np.int32)
    n = int(alive.size)
    load_s = time.perf_counter() - t_load
    log(f"{args.method}: removing {forget.size} of {n} examples ({forget.size / n:.1%})")
    if args.budget is not None and R.applicable("trajectory", problem) is not None:
        raise UsageError(f"--budget sets trajectory unlearning's retraining budget, and trajectory unlearning does not "
                         f"apply to this run: {R.applicable('trajectory', problem)}. Drop --budget.")
    options = {} if args.budget is None else {"budget": args.budget}
    try:
        inspect.signature(R.get_method(args.method).run).bind(problem, local, **options)
    except TypeError:
        raise UsageError(f"--budget sets trajectory unlearning's retraining budget; --method {args.method} "
                         "does not retrain along a trajectory. Drop --budget, or use --method mini.") from None
    res = R.run_method(args.method, problem, local, **options)
    log(f"{args.method}: {res.reason} in {res.time_s:.3f}s (+{res.compile_s:.2f}s compile)")

    original = res.info.get("own_original", run.params)
    unread = nonmember_indices(meta, len(ds.x_test))
    x_test, y_test = ds.x_test[unread], ds.y_test[unread]
    report = {
        "method": args.method, "ratio": float(forget.size / n), "n_train": n, "n_removed": int(forget.size),
        "converged": bool(res.converged), "reason": res.reason, "convex": bool(run.objective.is_convex),
        "unlearn_s": res.time_s, "time_s": res.time_s, "compile_s": res.compile_s, "load_s": load_s,
        **evaluate(run.objective, res.params, x, y, local, x_test, y_test), "n_test": int(unread.size),
        "seed": args.seed, "run": str(run_dir), "data_spec": meta["data_spec"],
        "param_count": meta["param_count"], "snapshot_buffer_bytes": meta["snapshot_buffer_bytes"],
        "curvature_stats_bytes": meta["curvature_stats_bytes"],
        "details": {k: v for k, v in res.info.items() if k != "own_original"},
    }
    if res.converged:
        # ready the result for the next request: buffer and curvature statistics at the new
        # parameters (one pass over the remaining data; part of what a request costs)
        log("refreshing the snapshot buffer and curvature statistics for the next request ...")
        nxt = M.refresh_for_next_request(problem, res.params, local, res.buffers)
        report["refresh_s"], report["refresh_compile_s"] = nxt.time_s, nxt.compile_s
    if args.certify and res.converged:
        from ..core.certificate import certify_removal

        log("certificate: one exact pass over the remaining data ...")
        c = certify_removal(run.objective, res.params, x, y, local)
        report["certificate"] = {k: getattr(c, k) for k in ("bound", "estimate", "is_bound", "reason", "grad_norm",
                                                               "mu", "dtype", "time_s", "compile_s")}
        report["certify_s"] = c.time_s
    ref = None
    if args.compare_retrain or args.mia:
        t_ref = time.perf_counter()
        own = R.get_method(args.method).own_reference
        if own is not None:
            log(f"{args.method}: its reference is its own recipe on the remaining data ({own.__name__}) ...")
            ref = own(problem, local)
        else:
            log(f"retraining on the remaining data for reference ({problem.train_config.steps} steps at most) ...")
            ref = R.run_method(R.ground_truth_method(), problem, local, verbose=True)
        report["reference_wall_s"] = time.perf_counter() - t_ref
    if args.mia:
        from ..evaluation.privacy import mia_for_report

        log("membership inference (loss attack): forget set vs held-out test examples ...")
        report["mia"] = mia_for_report(problem, ds, local, res.params, ref.params, original, seed=args.seed,
                                       nonmembers=(x_test, y_test))
    if args.compare_retrain:
        retrain_s = max(ref.time_s, 1e-12)
        report.update(compare(run.objective, res.params, ref.params, original, x, y, local, x_test, y_test))
        report.update({
            "retrain_time_s": ref.time_s, "retrain_compile_s": ref.compile_s,
            "time_ratio": (res.time_s + report.get("refresh_s", 0.0) + report.get("certify_s", 0.0)) / retrain_s,
            "solve_time_ratio": res.time_s / retrain_s,
        })
    from .runtime import cache_counts

    report["compile_cache"] = dict(cache_counts(), dir=args.compile_cache_dir)
    if not res.converged:
        report["wall_s"] = process_wall_s()
        text = json.dumps(report, indent=2, default=float)
        atomic.write_files_atomic(out, {"report.json": text}, overwrite=args.overwrite)
        log(f"NOT CONVERGED: {res.reason}. report.json written to {out}; no model was saved.")
        if args.retire_source:
            log(f"--retire-source: {run_dir} was not retired (there is no unlearned result to replace it)")
        print(summary_line(report, out) if not args.json else text)
        return EXIT_NOT_CONVERGED
    removed_all = np.concatenate([run.removed, forget]).astype(np.int32)
    entry = {"method": args.method, "n_removed": int(forget.size), "time_s": res.time_s,
             "data_fingerprint": meta["data_fingerprint"], "parent": str(run_dir),
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    nxt_traj = nxt.problem.extras.get("trajectory")
    if nxt_traj is not None:  # the refreshed trajectory: last slot the new model, profile on the remaining data
        meta = dict(meta, trajectory=dict(meta["trajectory"], profile=[float(v) for v in np.asarray(nxt_traj.profile)]))
    new_meta = dict(meta, kind="unlearned", n_train=int(n - forget.size), ledger=list(meta.get("ledger", [])) + [entry],
                    test_acc=report["test_acc"], n_test=report["n_test"], train_acc=report["retain_acc"],
                    steps_run=None, final_grad_norm=None,
                    curvature_stats_bytes=nbytes(nxt.problem.stats) if nxt.problem.stats is not None else 0)
    report["wall_s"] = process_wall_s()  # up to writing the result (measured before the write)
    text = json.dumps(report, indent=2, default=float)
    # the trained run's optimizer state (moments or curvature pairs over the removed examples) is not
    # carried over: the unlearned run stores the optimizer's initial state at its own parameters
    from ..core.training import make_optimizer

    ck.save_run(out, params=res.params, opt_state=make_optimizer(run.train_config).init(res.params),
                snapshots=nxt.problem.snapshots,
                stats=nxt.problem.stats, removed=removed_all, meta=new_meta, objective=run.objective,
                trajectory=None if nxt_traj is None else nxt_traj.state, overwrite=args.overwrite,
                extra_files={"report.json": text})
    if probs_file is not None:
        p_test = mt.predict_probs(run.objective, res.params, x_test)
        p_forget = mt.predict_probs(run.objective, res.params, x[local])
        atomic.write_npz_atomic(probs_file, {"test": p_test.astype(np.float32), "forget": p_forget.astype(np.float32),
                                         "forget_indices": forget, "test_indices": unread},
                            overwrite=args.overwrite)
    if args.retire_source:  # only now that the successor is complete (retire_run loads and checks it again)
        from .retire import retire_run

        try:
            retire_run(run_dir, out, reason=f"unlearn --retire-source: {args.method} removed {forget.size} examples")
        except ck.CheckpointError as e:
            raise ck.CheckpointError(f"the result was written to {out}, but --run was not retired: {e}") from e
        log(f"retired {run_dir}: its parameters, buffers and statistics are deleted, its ledger is kept")
    print(summary_line(report, out) if not args.json else text)
    return 0


def summary_line(r: dict, out: Path) -> str:
    """One human line per unlearn command (report.json holds everything)."""
    head = f"{r['method']}: removed {r['n_removed']} of {r['n_train']} ({r['ratio']:.1%})"
    if not r["converged"]:
        return f"{head}: NOT CONVERGED ({r['reason']}); report in {out}/report.json, no model saved"
    text = (f"{head} in {r['unlearn_s']:.2f}s + {r.get('refresh_s', 0.0):.2f}s refresh "
            f"(+{r['compile_s'] + r.get('refresh_compile_s', 0.0):.1f}s compile); accuracy retain "
            f"{r['retain_acc']:.4f}, forget {r['forget_acc']:.4f}, test {r['test_acc']:.4f}")
    if "time_ratio" in r:
        text += (f"; retraining ({r['retrain_time_s']:.2f}s): retain {r['retrain_retain_acc']:.4f}, forget "
                 f"{r['retrain_forget_acc']:.4f}, test {r['retrain_test_acc']:.4f}; time ratio {r['time_ratio']:.3f}")
        if r.get("convex"):  # for a convex model the retrained optimum is unique: how close it came
            text += f", KL ratio {r['kl_ratio']:.3f}, rel param error {r['rel_param_error']:.3f}"
    if "certificate" in r:
        c = r["certificate"]
        text += (f"; certified distance to the retrained optimum <= {c['bound']:.3g}" if c["is_bound"] else
                 f"; distance to the retrained optimum ~ {c['estimate']:.3g} (an estimate: {c['reason']})")
    if "mia" in r and "auc_gap_to_retrain" in r["mia"]:
        m = r["mia"]
        text += f"; loss-attack AUC {m['unlearned']['auc']:.3f} (retraining {m['retrain']['auc']:.3f})"
    return text + f"; command {r['wall_s']:.1f}s -> {out}"


# -- attack ---------------------------------------------------------------------------------


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
    from ..evaluation import attacks as A
    from . import atomic

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
    from ..core import methods as M
    from ..core import registry as R
    from ..evaluation.privacy import (
        PLOT_ATTACKS,
        full_suite,
        shadow_recipe,
        summarize,
    )
    from . import atomic
    from . import checkpoint as ck

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


def cmd_info(args) -> int:
    from . import checkpoint as ck
    from .retire import RetiredRunError

    try:
        meta, tomb = ck.read_meta(args.run), None
    except RetiredRunError as e:  # a retired run: its ledger and tombstone remain, and are shown
        meta, tomb = e.meta, e.tombstone
        if e.note:
            log(f"note: {e.note}")
    keys = ["kind", "model", "hidden", "l2", "data_spec", "data_fingerprint", "n_train_original", "n_train",
            "steps_run", "final_grad_norm", "train_acc", "test_acc", "n_test", "param_count", "snapshot_buffer_bytes",
            "curvature_stats_bytes"]
    for k in keys:
        if k == "hidden" and meta.get("model") == "logreg":
            continue  # a logistic model has no hidden layer
        if meta.get(k) is not None:
            print(f"{k:24s} {meta[k]}")
    ledger = meta.get("ledger", [])
    print(f"ledger                   {len(ledger)} request(s), {meta.get('n_removed_total', 0)} examples removed")
    for i, e in enumerate(ledger):
        print(f"  #{i + 1} {e['date']}  {e['method']:10s} removed {e['n_removed']:7d}  {e['time_s']:.3f}s  "
              f"data {e['data_fingerprint'][:12]}")
    if tomb is not None:
        print(f"retired                  {tomb.get('retired_at')} ({tomb.get('reason')}); successor "
              f"{tomb.get('successor')}; was {tomb.get('kind_before')}, {len(tomb.get('deleted', []))} entries deleted")
    if args.indices:
        removed = np.load(Path(args.run) / "removed.npy") if tomb is not None else ck.load_run(args.run).removed
        print(json.dumps(removed.tolist()))
    return 0


# -- audit ----------------------------------------------------------------------------------


def cmd_audit(args) -> int:
    """``mini-unlearn audit``: loss-attack every stored parameter set of a run (app/audit.py);
    returns 0 on PASS, EXIT_AUDIT_FAIL on FAIL. Writes nothing."""
    from . import checkpoint as ck
    from .audit import audit_run, check_forget_indices, format_report

    if not (np.isfinite(args.tolerance) and args.tolerance >= 0):
        raise UsageError(f"--tolerance must be a finite number >= 0, got {args.tolerance}")
    indices = read_forget_file(Path(args.forget))
    meta = ck.read_meta(args.run)  # a missing or foreign run directory fails here, before anything heavy
    try:
        check_forget_indices(indices, int(meta.get("n_train_original") or meta.get("n_train") or 0))
    except ValueError as e:
        raise UsageError(f"--forget {args.forget}: {e}") from e
    report = audit_run(args.run, indices, tolerance=args.tolerance)
    for note in report.notes:
        log(f"note: {note}")
    print(json.dumps(report.to_dict(), indent=2, default=float) if args.json else format_report(report))
    return 0 if report.passed else EXIT_AUDIT_FAIL


# -- retire ---------------------------------------------------------------------------------


def cmd_retire(args) -> int:
    """``mini-unlearn retire``: delete a run's model now that its unlearned successor exists,
    keeping its ledger and a tombstone (app/retire.py: checked first, one atomic step, crash-safe).
    A run already retired is only reported (and a deletion an interruption left is finished)."""
    from .retire import finish_retire, read_retired, retire_run

    run, successor = Path(args.run).absolute(), Path(args.successor).absolute()
    retired = read_retired(run)
    if retired is not None:
        tomb = retired[1]
        note = finish_retire(run)
        if note:
            log(f"note: {note}")
        other = "" if tomb.get("successor") == str(successor) else f" (not {successor}, as given)"
        print(f"{run} was already retired on {tomb.get('retired_at')} ({tomb.get('reason')}); its successor is "
              f"{tomb.get('successor')}{other}. Nothing to do.")
        return 0
    retire_run(run, successor, reason=args.reason)
    print(f"retired {run}: its parameters, buffers and statistics are deleted; its ledger, removed.npy and "
          f"tombstone.json remain; successor {successor}")
    return 0


# -- entry point ----------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows an option's default where it has one that its help does not already state."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.required or any(action.default is v for v in (None, False, argparse.SUPPRESS))
                or "(default" in text or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from ..core import registry as R

    p = argparse.ArgumentParser(prog="mini-unlearn", description="Train, unlearn and evaluate (Mini-Unlearning in JAX).",
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=_Formatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{train,unlearn,info,attack,audit,retire}")
    t = sub.add_parser("train", help="train a model and save a run directory", formatter_class=_Formatter)
    t.add_argument("--data", required=True, help="fashion_mnist[:n_train=N,n_test=M] | mnist5k | digits | breast_cancer "
                   "| covtype | npz:PATH | synthetic[:n=,n_test=,d=,classes=,seed=,sep=] | tfds:NAME[:TRAIN;TEST]")
    t.add_argument("--model", required=True, choices=["logreg", "mlp"], help="model family")
    t.add_argument("--l2", type=float, default=1e-3, help="L2 penalty on the weights (bias not penalised)")
    t.add_argument("--penalize-bias", action="store_true",
                   help="put the L2 penalty on every parameter, biases too: logistic regression is then "
                        "l2-strongly convex, and `unlearn --certify` gives a guaranteed error bound")
    t.add_argument("--hidden", type=int, default=256, help="hidden width of the MLP (ignored for logreg)")
    t.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batch order")
    t.add_argument("--out", required=True, help="new (or empty) run directory to write")
    t.add_argument("--steps", type=int, help="override the recipe's number of steps")
    t.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    t.add_argument("--lr", type=float, help="override the recipe's learning rate (adam/sgd)")
    t.add_argument("--optimizer", choices=["lbfgs", "adam", "sgd"], help="override the recipe's optimizer")
    t.add_argument("--snapshots", type=int, help="override the snapshot buffer size K")
    t.add_argument("--heldout", type=int, metavar="N",
                   help="MLP (trajectory) runs: hold out N test images for the rewind rule and the calibration "
                        "(default 500; they are left out of every test metric and never MIA non-members). The "
                        "rule's noise falls as 1/sqrt(N): ~0.013 at 500, as large as its threshold 0.01")
    u = sub.add_parser("unlearn", help="remove examples from a trained run into a new run directory",
                       formatter_class=_Formatter)
    u.add_argument("--run", required=True, help="run directory from `train` (or an earlier `unlearn`)")
    u.add_argument("--method", default="mini", metavar="NAME",
                   help="unlearning method, one of the registry's -- " + "; ".join(R.describe().splitlines()))
    u.add_argument("--ratio", type=float, help="remove this fraction of the remaining examples, drawn with --seed")
    u.add_argument("--forget", help="file of training indices to remove: .npy integer array, or text with one per line")
    u.add_argument("--seed", type=int, default=0, help="seed of the --ratio draw and of the MIA subsampling")
    u.add_argument("--budget", type=float, metavar="F",
                   help="trajectory runs (MLPs): retrain for this fraction of the training recipe's steps "
                        "(default: TrajectoryConfig.budget, docs/cli.md; a short recipe may need more to match "
                        "retraining's accuracy, at that much more time)")
    u.add_argument("--compare-retrain", action="store_true",
                   help="also retrain on the remaining data and report fidelity and time ratios against it")
    u.add_argument("--out", required=True, help="new (or empty) directory for the result")
    u.add_argument("--export-probs", metavar="FILE.npz",
                   help="also write the unlearned model's probabilities here: 'test' (rows: the test images "
                        "'test_indices', those the method never read) and 'forget' (rows: the training images "
                        "'forget_indices')")
    u.add_argument("--overwrite", action="store_true",
                   help="replace --out (and --export-probs) if it holds an earlier result of mini-unlearn and "
                        "nothing else; anything else is never replaced")
    u.add_argument("--mia", action="store_true",
                   help="add a loss-threshold membership-inference report (original / retrain / unlearned)")
    u.add_argument("--certify", action="store_true",
                   help="one exact pass over the remaining data: a guaranteed bound on the distance to the "
                        "retrained optimum where the objective is strongly convex in every parameter "
                        "(train --penalize-bias), else an estimate; its time counts in time_ratio")
    u.add_argument("--json", action="store_true", help="print the whole report.json instead of one summary line")
    u.add_argument("--retire-source", action="store_true",
                   help="once the result is written and checked, retire --run (see `retire`): its parameters, "
                        "buffers and statistics are deleted, its ledger kept. Nothing is retired when the method "
                        "does not converge")
    add_attack_parser(sub)
    i = sub.add_parser("info", help="print a run's metadata and deletion ledger", formatter_class=_Formatter)
    i.add_argument("run", help="run directory")
    i.add_argument("--indices", action="store_true", help="also print the removed indices")
    r = sub.add_parser("retire", help="delete a run's model once its unlearned successor exists; keep its ledger",
                       description="Check that --successor is a complete unlearned run derived from RUN_DIR, then "
                                   "replace RUN_DIR in one atomic step by its deletion ledger (run.json, "
                                   "removed.npy) and a tombstone.json: its parameters, snapshot buffer, optimizer "
                                   "state and statistics are deleted. Refused, with nothing changed, for anything "
                                   "mini-unlearn did not write. Retiring a retired run again does nothing.",
                       formatter_class=_Formatter)
    r.add_argument("run", metavar="RUN_DIR", help="run directory to retire (from `train` or `unlearn`)")
    r.add_argument("--successor", required=True, metavar="OUT_DIR", help="the unlearned run that replaces it (the --out of "
                   "`unlearn --run RUN_DIR`)")
    r.add_argument("--reason", default="superseded by its unlearned successor", help="recorded in the tombstone")
    d = sub.add_parser("audit", help="check that no stored artefact of a run remembers removed examples",
                       description="Loss-threshold membership attack (AUC of -loss; members the --forget "
                                   "examples, non-members the test images unlearning never read) on every "
                                   "parameter set the run stores: the model, each trajectory and snapshot "
                                   "slot, params0. FAIL (exit 3) when one's AUC exceeds the model's by more "
                                   "than --tolerance. Writes nothing.", formatter_class=_Formatter)
    d.add_argument("run", help="run directory (from `train` or `unlearn`)")
    d.add_argument("--forget", required=True,
                   help="file of original training indices: .npy integer array, or text with one per line")
    d.add_argument("--tolerance", type=float, default=0.03,
                   help="how far a stored artefact's AUC may exceed the model's before the verdict is FAIL")
    d.add_argument("--json", action="store_true", help="print the whole report as JSON instead of the table")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import DataError
    from .runtime import enable_compilation_cache, interrupts_not_lost, quiet_third_party_logs

    try:
        with interrupts_not_lost():
            quiet_third_party_logs()
            args.compile_cache_dir = None
            if args.cmd in ("train", "unlearn", "attack"):
                cache = enable_compilation_cache()
                args.compile_cache_dir = str(cache) if cache is not None else None
            cmd = {"train": cmd_train, "unlearn": cmd_unlearn, "info": cmd_info, "retire": cmd_retire, "attack": cmd_attack,
                   "audit": cmd_audit}[args.cmd]
            return cmd(args)
    except (UsageError, DataError, CheckpointError, FileExistsError, ValueError) as e:
        print(f"mini-unlearn {args.cmd}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"\nmini-unlearn {args.cmd}: interrupted; nothing was written (outputs appear only when complete)",
              file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
