"""Retiring a run once its unlearned successor exists: its model goes, its deletion ledger stays.

``mini-unlearn unlearn`` writes a new run and never touches the old one, so the removed examples
still shape the old run's parameters, snapshot buffer, optimizer state and curvature statistics.
Whoever must delete data finishes the deletion by retiring the old run: everything under
``RUN/ckpt`` (and its report) is deleted, and ``RUN`` keeps only what documents the deletion::

    RUN/run.json         the old metadata with kind "retired" and a "retired" record; the ledger stays
    RUN/removed.npy      the ledger's indices, as before
    RUN/tombstone.json   {"retired_at", "reason", "successor", "kind_before", "deleted", "pending"}
    RUN/.mini-unlearn    marker, kind "retired" (never replaced by --overwrite, never loaded)

:func:`retire_run` first checks that the successor is a complete unlearned run derived from
``RUN`` (it loads; kind "unlearned"; its last ledger entry names ``RUN`` as parent; its removed
indices contain ``RUN``'s; same data fingerprint and model) and that ``RUN`` is a trained or
unlearned run of this tool holding nothing else. Any failure raises and changes nothing.

Crash safety: ``RUN`` only ever holds the old run or the retired one, and every interruption
ends in one of the two. The retired directory is built complete in a hidden sibling
``.RUN.retire-XXXX`` (marker first, so that a build cut short is recognisably ours), its
tombstone naming as ``pending`` the aside name ``.RUN.retire-YYYY`` the old payload will take; the
filesystems are flushed (``os.sync``); then the two renames of
atomic.py's protocol (:func:`~atomic.replace_by_renames`): ``RUN`` -> the aside name (checked
again to be a run of ours holding nothing else, else renamed back and nothing changes), build
-> ``RUN``. Between the two renames nothing is at ``RUN``, both copies complete beside it: the
next touch of ``RUN`` (:func:`retire_run`, :func:`check_retirable`, :func:`~checkpoint.read_meta`
/ :func:`~checkpoint.load_run`, ``is_run``, ``check_output_dir``: :func:`~atomic.recover`)
renames the old run back and deletes the build, so an interrupted retire is one that did not
happen. After the second rename the old payload at the aside name is deleted entry by entry,
its marker last, so a deletion cut short leaves a directory still marked as ours; if the
process dies before the deletion ends, the next :func:`retire_run` of ``RUN`` or
:func:`~checkpoint.read_meta` / :func:`~checkpoint.load_run` of it
(:func:`~tombstone.finish_retire`) deletes what is left -- only if its marker is this tool's and
it holds nothing the marker does not list.

Reading a retired run and finishing an interrupted retire live in tombstone.py (which
checkpoint.py uses, so that loading a retired run says so); this module does the retiring and
imports atomic.py, checkpoint.py and tombstone.py. ``RetiredRunError``, ``read_retired`` and
``finish_retire`` are importable from here too.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .atomic import _protected, _umask, recover, replace_by_renames, scratch_dir
from .checkpoint import load_run, read_meta
from .markers import (
    MARKER_FORMAT,
    MARKER_NAME,
    TOOL,
    CheckpointError,
    _describe,
    _foreign_entries,
    read_marker,
)
from .tombstone import (  # noqa: F401  (re-exported: rt.RetiredRunError, rt.TOMBSTONE_NAME, ...)
    RETIRABLE_KINDS,
    RETIRED_KIND,
    TOMBSTONE_NAME,
    RetiredRunError,
    _clean_stale_builds,
    _delete_owned,
    _fsync_dir,
    _owned_payload,
    _trash_prefix,
    finish_retire,
    read_retired,
    retired_error,
)

KEPT = ("removed.npy", "run.json")  # what a retired run keeps of the old one (run.json rewritten)
# fields that must agree between a run and its successor: the same model on the same data
MODEL_FIELDS = ("model", "hidden", "num_classes", "input_shape", "l2", "penalize_bias", "n_train_original",
                "objective")


# -- filesystem steps (each one a point the crash test kills the process at) --------------------


# -- checks -------------------------------------------------------------------------------------


def check_retirable(source: str | os.PathLike) -> dict:
    """Raise CheckpointError unless ``source`` is a trained or unlearned run written by this tool
    that holds nothing else (the only directories retire_run deletes from); returns its marker.
    A retired run raises RetiredRunError."""
    source = Path(source).absolute()
    recover(source)  # a retire killed between its two renames: the old run goes back
    if os.path.islink(source):
        raise CheckpointError(f"{source} is a symbolic link (to {os.readlink(source)}); retire the run directory "
                              "it points to, by its own path")
    if not source.is_dir():
        raise CheckpointError(f"{source} does not exist or is not a directory: give the --out directory of a "
                              "`mini-unlearn train` or `unlearn` run")
    why = _protected(source)
    if why:
        raise CheckpointError(f"{source} {why}; it is not retired -- run the command from another directory")
    marker = read_marker(source)
    if marker is None:
        names = sorted(os.listdir(source))
        raise CheckpointError(f"{source} was not written by mini-unlearn (it has no {MARKER_NAME} marker; it holds "
                              f"{_describe(names) or 'nothing'}); nothing in it is deleted. Retire only a run "
                              "directory that `mini-unlearn train` or `unlearn` wrote; delete anything else yourself")
    if marker["kind"] == RETIRED_KIND:
        raise retired_error(source)
    if marker["kind"] not in RETIRABLE_KINDS or marker.get("format_version") != MARKER_FORMAT:
        raise CheckpointError(f"{source} holds a mini-unlearn {marker['kind']!r} output (marker format "
                              f"{marker.get('format_version')!r}), not a trained or unlearned run; only runs are "
                              "retired, nothing was deleted")
    foreign = _foreign_entries(source, marker)
    if foreign:
        raise CheckpointError(f"{source} holds a mini-unlearn run but also {len(foreign)} "
                              f"entr{'y' if len(foreign) == 1 else 'ies'} that mini-unlearn did not write "
                              f"({_describe(foreign)}); nothing was deleted -- move those out of it and retire again")
    return marker


def _same_path(a: str, b: Path) -> bool:
    if os.path.normpath(a) == os.path.normpath(str(b)):
        return True
    try:
        return Path(a).resolve() == b.resolve()
    except OSError:
        return False


def check_successor(source: Path, source_meta: dict, source_removed: np.ndarray, successor: Path, *,
                    objective=None, like=None) -> dict:
    """Raise CheckpointError unless ``successor`` is a complete unlearned run derived from
    ``source``; returns its metadata. Reads only."""
    if successor == source or source in successor.parents:
        raise CheckpointError(f"the successor {successor} is the run to retire or inside it")
    try:
        succ = load_run(successor, objective=objective, like=like)
    except CheckpointError as e:
        raise CheckpointError(f"the successor {successor} is not a complete run, so {source} is not retired: {e}") from e
    meta, bad = succ.meta, []
    if meta.get("kind") != "unlearned":
        bad.append(f"its kind is {meta.get('kind')!r}, not 'unlearned'")
    ledger, src_ledger = meta.get("ledger") or [], source_meta.get("ledger") or []
    parent = ledger[-1].get("parent") if ledger and isinstance(ledger[-1], dict) else None
    if not isinstance(parent, str) or not _same_path(parent, source):
        bad.append(f"its last ledger entry's parent is {parent!r}, not {str(source)!r}")
    elif ledger[:-1] != src_ledger:
        bad.append("its ledger does not extend the run's ledger")
    missing = np.setdiff1d(source_removed, succ.removed)
    if missing.size:
        bad.append(f"it still holds {missing.size} examples the run had removed (e.g. {missing[:5].tolist()})")
    if meta.get("data_fingerprint") != source_meta.get("data_fingerprint"):
        bad.append("its data fingerprint differs")
    diff = [k for k in MODEL_FIELDS if meta.get(k) != source_meta.get(k)]
    if diff:
        bad.append(f"its model differs ({', '.join(f'{k} {meta.get(k)!r} vs {source_meta.get(k)!r}' for k in diff)})")
    if bad:
        raise CheckpointError(f"{successor} is not a successor of {source}: " + "; ".join(bad) + f". Nothing was "
                              f"changed -- give the --out of `mini-unlearn unlearn --run {source}`")
    return meta


# -- retiring -----------------------------------------------------------------------------------


def _build_retired(tmp: Path, source: Path, meta: dict, marker: dict, successor: Path, reason: str,
                   pending: str) -> dict:
    """Fill the hidden directory ``tmp`` with the retired run (marker first); returns the tombstone,
    which names as ``pending`` the aside name the old payload is renamed to."""
    entries = sorted(KEPT + (TOMBSTONE_NAME,))
    (tmp / MARKER_NAME).write_text(json.dumps({"tool": TOOL, "kind": RETIRED_KIND, "format_version": MARKER_FORMAT,
                                               "entries": entries}, indent=1) + "\n")
    tomb = {"retired_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "reason": reason,
            "successor": str(successor), "kind_before": marker["kind"],
            "deleted": [e for e in marker["entries"] if e not in KEPT], "pending": pending}
    record = {k: tomb[k] for k in ("retired_at", "reason", "successor", "kind_before")}
    (tmp / "run.json").write_text(json.dumps(dict(meta, kind=RETIRED_KIND, retired=record), indent=2))
    shutil.copyfile(source / "removed.npy", tmp / "removed.npy")
    (tmp / TOMBSTONE_NAME).write_text(json.dumps(tomb, indent=2) + "\n")
    os.chmod(tmp, source.stat().st_mode & 0o7777 if source.exists() else 0o777 & ~_umask())
    return tomb


def retire_run(source: str | os.PathLike, successor: str | os.PathLike, *, reason: str,
               objective=None, like=None) -> Path:
    """Retire the run ``source`` now that ``successor`` (an unlearned run derived from it)
    exists: delete its parameters, buffers, optimizer state and statistics, keep its ledger,
    removed.npy and a tombstone (see the module docstring for the layout and the crash-safety
    design). Returns ``source`` (absolute).

    Refused with CheckpointError, nothing changed: a successor that does not load or is not
    derived from ``source``; a ``source`` this tool did not write, that is not a trained or
    unlearned run or that holds anything else.
    An already retired ``source`` is a no-op (it only finishes a pending deletion); use
    :func:`read_retired` to tell. ``objective``/``like``: passed to load_run for a successor of
    your own model."""
    source, successor = Path(source).absolute(), Path(successor).absolute()
    if not reason or not reason.strip():
        raise ValueError("retire_run: give a reason (it is recorded in the tombstone)")
    if read_retired(source) is not None:
        finish_retire(source)
        return source
    marker = check_retirable(source)
    meta = read_meta(source)
    try:
        removed = np.load(source / "removed.npy", allow_pickle=False).astype(np.int64).reshape(-1)
    except Exception as e:
        raise CheckpointError(f"{source}/removed.npy (the deletion ledger's indices) is missing or corrupted ({e}); "
                              "nothing was deleted") from e
    check_successor(source, meta, removed, successor, objective=objective, like=like)
    _clean_stale_builds(source, None)
    aside = source.with_name(_trash_prefix(source) + secrets.token_hex(6))

    def still_ours(old: Path) -> None:  # something added after the last check goes back with the run
        payload, foreign = _owned_payload(old, RETIRABLE_KINDS)
        if payload is None or foreign:
            raise CheckpointError(f"{source} changed while it was being retired (it now also holds "
                                  f"{_describe(foreign) or 'something else'}); it was put back as it was, nothing "
                                  "was deleted -- move those out of it and retire again")

    with scratch_dir(source.parent, _trash_prefix(source)) as tmp:
        _build_retired(tmp, source, meta, marker, successor, reason.strip(), aside.name)
        os.sync()  # every file of the successor and of the retired build on disk before the renames
        check_retirable(source)  # again, just before the renames: nothing added meanwhile
        replace_by_renames(tmp, source, aside, still_ours)
        _fsync_dir(source.parent)
    # ``source`` is retired; the old payload, checked to be exactly ours, is at ``aside``
    _delete_owned(aside)
    _fsync_dir(source.parent)
    return source
