"""``mini-unlearn audit``: does any stored artefact of a run remember the removed examples?

:func:`audit_run` loads a run directory and its data, collects every parameter set the run
stores (:func:`stored_param_sets`: the model, each written slot of the trajectory buffer, each
written slot of the snapshot buffer, the initial parameters if saved) and hands them to
:func:`~mini_unlearn_jax.evaluation.audit.audit_params`: a loss-threshold membership attack on
each, members the given forget examples, non-members the test images the run's unlearning
never read. :func:`format_report` is the command's table. Nothing is written to disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ..evaluation.audit import DEFAULT_TOLERANCE, AuditReport, audit_params

Params = Any


def check_forget_indices(indices: Any, n: int) -> np.ndarray:
    """The forget indices as a sorted int64 array, checked against a training set of ``n``
    (original indices): a non-empty 1-D integer array, every index in ``[0, n)``, each once.

    Raises:
      ValueError: with what is wrong.
    """
    a = np.asarray(indices)
    if a.ndim != 1:
        raise ValueError(f"forget indices must be a 1-D array, got shape {a.shape}")
    if a.size == 0:
        raise ValueError("the forget set is empty: give at least one training index to audit")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"forget indices must be integers, got dtype {a.dtype}")
    if a.min() < 0 or a.max() >= n:
        bad = a[(a < 0) | (a >= n)]
        raise ValueError(f"forget indices must lie in [0, {n}) (the run's original training "
                         f"indices); {bad.size} do not (e.g. {bad[:5].tolist()})")
    uniq = np.unique(a)
    if uniq.size != a.size:
        raise ValueError(f"forget indices hold {a.size - uniq.size} duplicates; "
                         "give each index once")
    return uniq.astype(np.int64)


def _slot(tree: Params, i: int) -> Params:
    return jax.tree.map(lambda a: a[i], tree)


def stored_param_sets(run) -> tuple[dict[str, Params], dict[str, int | None]]:
    """``(param_sets, steps)``: every parameter set ``run`` (a loaded :class:`Run`) stores, by name.

    ``model`` (the run's parameters); ``trajectory[i] step s`` for each written slot ``i`` of the
    trajectory buffer (``steps[i] >= 0``); ``snapshots[slot i] step s`` for each written slot of
    the snapshot buffer, oldest step first; ``params0`` when the initial parameters are saved.
    """
    sets: dict[str, Params] = {"model": run.params}
    steps: dict[str, int | None] = {"model": run.meta.get("steps_run")}
    if run.trajectory is not None:
        for i, s in enumerate(np.asarray(run.trajectory.steps).tolist()):
            if s >= 0:
                name = f"trajectory[{i}] step {s}"
                sets[name], steps[name] = _slot(run.trajectory.params, i), int(s)
    if run.snapshots is not None:
        snap_steps = np.asarray(run.snapshots.steps)
        written = np.flatnonzero(snap_steps >= 0).tolist()
        for i in sorted(written, key=lambda j: (int(snap_steps[j]), j)):
            s = int(snap_steps[i])
            name = f"snapshots[slot {i}] step {s}"
            sets[name], steps[name] = _slot(run.snapshots.params, i), s
    if run.params0 is not None:
        sets["params0"], steps["params0"] = run.params0, 0
    return sets, steps


def audit_run(run_dir: str | os.PathLike, forget_indices: Any, *,
              tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> AuditReport:
    """Audit every stored parameter set of the run directory ``run_dir`` against ``forget_indices``.

    Members are the training examples ``forget_indices`` (original indices, as in ``unlearn
    --forget``), non-members the test images the run's unlearning never read: all but a
    trajectory run's held-out split, as ``unlearn`` and ``attack`` choose them
    (:func:`~mini_unlearn_jax.app.recipes.unread_test_indices`, which ``cli.nonmember_indices``
    wraps; this module does not import the CLI, which imports it). The two sets are balanced in
    count as in :func:`~mini_unlearn_jax.evaluation.audit.audit_params` (seeded by ``seed``).
    Indices the run has not removed yet are audited all the same (e.g. a trained run before
    unlearning, to see that the model remembers them); the report's notes say so. For the
    CLI's runs: their data is reloaded from the recorded spec and checked against its
    fingerprint.

    Returns:
      The :class:`~mini_unlearn_jax.evaluation.audit.AuditReport`, with ``info`` holding the
      run, its data, the numbers of forget indices and of those not yet removed.

    Raises:
      CheckpointError: a missing or corrupted run directory.
      DataError: the data cannot be loaded, or differs from what the run was trained on.
      ValueError: bad forget indices or tolerance.
    """
    from . import checkpoint as ck
    from .data import DataError, load_dataset
    from .recipes import unread_test_indices

    run_dir = Path(run_dir).absolute()
    meta = ck.read_meta(run_dir)
    if meta.get("n_train_original"):  # bad indices fail before the checkpoint and the data load
        check_forget_indices(forget_indices, int(meta["n_train_original"]))
    run = ck.load_run(run_dir)
    ds = load_dataset(run.meta["data_spec"])
    if ds.fingerprint() != run.meta["data_fingerprint"]:  # the check of cli.load_problem
        raise DataError(f"the data behind {run.meta['data_spec']!r} differs from what this run "
                        "was trained on (fingerprint mismatch); restore the original data or "
                        "retrain on the new data")
    forget = check_forget_indices(forget_indices, ds.n_train)
    not_removed = np.setdiff1d(forget, run.removed)
    held_out = (run.meta.get("trajectory") or {}).get("val_indices", [])
    unread = unread_test_indices(len(ds.x_test), held_out)
    sets, steps = stored_param_sets(run)
    report = audit_params(run.objective, sets, ds.x_train[forget], ds.y_train[forget],
                          ds.x_test[unread], ds.y_test[unread], steps=steps, tolerance=tolerance,
                          seed=seed)
    notes = []
    if not_removed.size:
        notes.append(f"{not_removed.size} of the {forget.size} forget indices have not been "
                     f"removed from this run (e.g. {not_removed[:5].tolist()}): the model was "
                     "trained on them, so this audit compares what the stored artefacts remember "
                     "with what the model remembers, not whether they were forgotten")
    info = {"run": str(run_dir), "run_kind": run.meta.get("kind"),
            "data_spec": run.meta.get("data_spec"),
            "n_forget": int(forget.size), "n_not_removed": int(not_removed.size),
            "n_removed_by_run": int(run.removed.size), "n_nonmember_pool": int(unread.size),
            "members": "the forget examples (training set)",
            "nonmembers": f"test images the run's unlearning never read ({unread.size}"
                          + ("; subsampled to the members' count where more)" if report.balanced
                             else ")")}
    return report.with_context(notes=notes, info=info)


def format_report(report: AuditReport) -> str:
    """The command's output: an aligned table (one row per stored parameter set), then the
    verdict line."""
    width = max(len("artefact"), *(len(r.name) for r in report.rows))
    head = f"{'artefact':<{width}}  {'step':>6}  {'AUC':>6}  {'+-se':>6}  {'vs model':>8}"
    lines = [head, "-" * len(head)]
    for r in report.rows:
        step = "" if r.step is None else str(r.step)
        mark = "  <- remembers more" if r.remembers_more else ""
        lines.append(f"{r.name:<{width}}  {step:>6}  {r.auc:6.3f}  {r.auc_se:6.3f}  "
                     f"{r.gap_to_model:+8.3f}{mark}")
    lines.append(verdict_line(report))
    return "\n".join(lines)


def verdict_line(report: AuditReport) -> str:
    """One line: PASS or FAIL, the model's AUC, the worst row and the tolerance."""
    n_stored = len(report.rows) - 1
    who = f"the {report.n_members} forget examples"
    w = report.worst
    if n_stored == 0:
        return ("PASS: the run stores no parameter set besides the model "
                f"(loss-attack AUC {report.model_auc:.3f})")
    if report.passed:
        return (f"PASS: none of the {n_stored} stored artefacts remembers {who} better than the "
                f"model (loss-attack AUC {report.model_auc:.3f}; worst {w.name} at {w.auc:.3f}, "
                f"tolerance {report.tolerance:.3f})")
    return (f"FAIL: {len(report.failing)} of the {n_stored} stored artefacts remember {who} better "
            f"than the model (loss-attack AUC above {report.model_auc:.3f} + "
            f"{report.tolerance:.3f}); worst {w.name} at {w.auc:.3f}")
