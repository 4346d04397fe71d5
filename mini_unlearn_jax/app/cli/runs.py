"""`mini-unlearn info`, `retire` and `audit`: read, retire and audit a run directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .common import (
    EXIT_AUDIT_FAIL,
    HelpFormatter,
    UsageError,
    log,
    read_forget_file,
)


def cmd_info(args) -> int:
    from .. import checkpoint as ck
    from ..retire import RetiredRunError

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
        if k == "hidden" and meta.get("model") != "mlp":
            continue  # only the MLP has a hidden width
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
    from .. import checkpoint as ck
    from ..audit import audit_run, check_forget_indices, format_report

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
    keeping its ledger and a tombstone (app/retire.py: checked first, then swapped in by two renames
    that the next touch of the run undoes if interrupted between them).
    A run already retired is only reported (and a deletion an interruption left is finished)."""
    from ..retire import finish_retire, read_retired, retire_run

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




def add_info_parser(sub) -> argparse.ArgumentParser:
    """Add ``info`` to the subparsers ``sub``."""
    i = sub.add_parser("info", help="print a run's metadata and deletion ledger", formatter_class=HelpFormatter)
    i.add_argument("run", help="run directory")
    i.add_argument("--indices", action="store_true", help="also print the removed indices")
    return i


def add_retire_parser(sub) -> argparse.ArgumentParser:
    """Add ``retire`` to the subparsers ``sub``."""
    r = sub.add_parser("retire", help="delete a run's model once its unlearned successor exists; keep its ledger",
                       description="Check that --successor is a complete unlearned run derived from RUN_DIR, then "
                                   "replace RUN_DIR by its deletion ledger (run.json, "
                                   "removed.npy) and a tombstone.json: its parameters, snapshot buffer, optimizer "
                                   "state and statistics are deleted. Refused, with nothing changed, for anything "
                                   "mini-unlearn did not write. Retiring a retired run again does nothing.",
                       formatter_class=HelpFormatter)
    r.add_argument("run", metavar="RUN_DIR", help="run directory to retire (from `train` or `unlearn`)")
    r.add_argument("--successor", required=True, metavar="OUT_DIR", help="the unlearned run that replaces it (the --out of "
                   "`unlearn --run RUN_DIR`)")
    r.add_argument("--reason", default="superseded by its unlearned successor", help="recorded in the tombstone")
    return r


def add_audit_parser(sub) -> argparse.ArgumentParser:
    """Add ``audit`` to the subparsers ``sub``."""
    d = sub.add_parser("audit", help="check that no stored artefact of a run remembers removed examples",
                       description="Loss-threshold membership attack (AUC of -loss; members the --forget "
                                   "examples, non-members the test images unlearning never read) on every "
                                   "parameter set the run stores: the model, each trajectory and snapshot "
                                   "slot, params0. FAIL (exit 3) when one's AUC exceeds the model's by more "
                                   "than --tolerance. Writes nothing.", formatter_class=HelpFormatter)
    d.add_argument("run", help="run directory (from `train` or `unlearn`)")
    d.add_argument("--forget", required=True,
                   help="file of original training indices: .npy integer array, or text with one per line")
    d.add_argument("--tolerance", type=float, default=0.03,
                   help="how far a stored artefact's AUC may exceed the model's before the verdict is FAIL")
    d.add_argument("--json", action="store_true", help="print the whole report as JSON instead of the table")
    return d
