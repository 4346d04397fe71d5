"""`mini-unlearn unlearn`: remove examples from a trained run into a new run directory."""

from __future__ import annotations

import argparse
import inspect
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ...core import registry as R
from ..runtime import process_wall_s
from .common import (
    EXIT_NOT_CONVERGED,
    HelpFormatter,
    UsageError,
    log,
    nonmember_indices,
    read_forget_file,
)


def check_ratio_args(args) -> None:
    """The checks that need neither the run nor the data (run before anything is loaded)."""
    if (args.ratio is None) == (args.forget is None):
        raise UsageError("give exactly one of --ratio FLOAT or --forget FILE (.npy, or text with one index per line)")
    if args.ratio is not None and not (0.0 < args.ratio < 1.0):
        raise UsageError(f"--ratio must lie strictly between 0 and 1, got {args.ratio}")


def load_forget(args, n_original: int, removed: np.ndarray, from_file: np.ndarray | None) -> np.ndarray:
    from ...core.mini import validate_indices

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
    from ..data import load_dataset

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
    from ...core import methods as M
    from ...core import registry as R
    from .. import atomic
    from .. import checkpoint as ck

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
        from ..retire import check_retirable

        check_retirable(run_dir)
    if args.budget is not None and not meta0.get("trajectory"):
        raise UsageError("--budget sets trajectory unlearning's retraining budget, and this run keeps no "
                         "trajectory buffer (only `train --model mlp` or `cnn` with a mini-batch optimizer does), so "
                         f"--method {args.method} is not trajectory unlearning here. Drop --budget.")

    from ...core.snapshots import nbytes
    from ...evaluation import metrics as mt
    from ...evaluation.compare import compare, evaluate

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
        from ...core.certificate import certify_removal

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
        from ...evaluation.privacy import mia_for_report

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
    from ..runtime import cache_counts

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
    from ...core.training import make_optimizer

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
        from ..retire import retire_run

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




def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``unlearn`` to the subparsers ``sub``."""
    u = sub.add_parser("unlearn", help="remove examples from a trained run into a new run directory",
                       formatter_class=HelpFormatter)
    u.add_argument("--run", required=True, help="run directory from `train` (or an earlier `unlearn`)")
    u.add_argument("--method", default="mini", metavar="NAME",
                   help="unlearning method, one of the registry's -- " + "; ".join(R.describe().splitlines()))
    u.add_argument("--ratio", type=float, help="remove this fraction of the remaining examples, drawn with --seed")
    u.add_argument("--forget", help="file of training indices to remove: .npy integer array, or text with one per line")
    u.add_argument("--seed", type=int, default=0, help="seed of the --ratio draw and of the MIA subsampling")
    u.add_argument("--budget", type=float, metavar="F",
                   help="trajectory runs (MLP, CNN): retrain for this fraction of the training recipe's steps "
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
    return u
