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

Crash safety: at every instant either ``RUN`` is exactly as before, or the successor is complete
and ``RUN`` is retired. The retired directory is built complete in a hidden sibling
``.RUN.retire-XXXX`` (marker first, so that a build cut short is recognisably ours), the
filesystems of the successor and of the build are flushed (syncfs(2)), and the two directories
are exchanged atomically (renameat2 RENAME_EXCHANGE, :func:`checkpoint.exchange`): one step
takes ``RUN`` from its old content to the retired one. The old payload is then at the hidden
name, which the tombstone records as ``pending``; it is deleted entry by entry, its marker last,
so a deletion cut short leaves a directory still marked as ours. If the process dies before the
deletion ends, the next :func:`retire_run` of ``RUN`` or :func:`~checkpoint.read_meta` /
:func:`~checkpoint.load_run` of it (:func:`~tombstone.finish_retire`) deletes what is left -- only
if its marker is this tool's and it holds nothing the marker does not list.

Reading a retired run and finishing an interrupted retire live in tombstone.py (which
checkpoint.py uses, so that loading a retired run says so); this module does the retiring and
imports checkpoint.py and tombstone.py. ``RetiredRunError``, ``read_retired`` and
``finish_retire`` are importable from here too.

Where the atomic exchange is unsupported (not Linux, or a filesystem without it) retiring is
refused, with nothing changed: a fallback by two renames would leave an instant with no run at
``RUN`` (or a half-deleted one), which is what this module promises never to show.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .checkpoint import _UNSUPPORTED, _protected, _umask, exchange, load_run, read_meta
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


def _syncfs(path: Path) -> None:
    """Flush the whole filesystem holding ``path`` to disk (Linux syncfs(2); os.sync elsewhere):
    one call makes every file of the successor and of the retired build durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None) if sys.platform.startswith("linux") else None
        if fn is None or fn(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


# -- checks -------------------------------------------------------------------------------------


def check_retirable(source: str | os.PathLike) -> dict:
    """Raise CheckpointError unless ``source`` is a trained or unlearned run written by this tool
    that holds nothing else (the only directories retire_run deletes from); returns its marker.
    A retired run raises RetiredRunError."""
    source = Path(source).absolute()
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


def _build_retired(tmp: Path, source: Path, meta: dict, marker: dict, successor: Path, reason: str) -> dict:
    """Fill the hidden directory ``tmp`` with the retired run (marker first); returns the tombstone."""
    entries = sorted(KEPT + (TOMBSTONE_NAME,))
    (tmp / MARKER_NAME).write_text(json.dumps({"tool": TOOL, "kind": RETIRED_KIND, "format_version": MARKER_FORMAT,
                                               "entries": entries}, indent=1) + "\n")
    tomb = {"retired_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "reason": reason,
            "successor": str(successor), "kind_before": marker["kind"],
            "deleted": [e for e in marker["entries"] if e not in KEPT], "pending": tmp.name}
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
    unlearned run or that holds anything else; a filesystem without an atomic exchange.
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
    tmp = Path(tempfile.mkdtemp(prefix=_trash_prefix(source), dir=source.parent))
    ident = (tmp.stat().st_dev, tmp.stat().st_ino)
    exchanged = False
    try:
        _build_retired(tmp, source, meta, marker, successor, reason.strip())
        _syncfs(successor)
        if successor.stat().st_dev != tmp.stat().st_dev:
            _syncfs(tmp)
        check_retirable(source)  # again, just before the step: nothing added meanwhile
        try:
            exchange(tmp, source)
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                raise CheckpointError(f"{source} is not retired: this system cannot exchange two directories "
                                      f"atomically (renameat2 RENAME_EXCHANGE: {e.strerror}), and mini-unlearn "
                                      "retires a run only in one atomic step; nothing was changed -- move the run "
                                      "to a local Linux filesystem (ext4, xfs, btrfs, tmpfs) to retire it") from e
            raise
        exchanged = True
        _fsync_dir(source.parent)
        # ``source`` is retired; the old payload is at ``tmp``. Delete it only if it is still
        # exactly ours: something added after the last check goes back with it, untouched.
        old, foreign = _owned_payload(tmp, RETIRABLE_KINDS)
        if old is None or foreign:
            exchange(tmp, source)
            exchanged = False
            _fsync_dir(source.parent)
            raise CheckpointError(f"{source} changed while it was being retired (it now also holds "
                                  f"{_describe(foreign) or 'something else'}); it was put back as it was, nothing "
                                  "was deleted -- move those out of it and retire again")
        _delete_owned(tmp)
        _fsync_dir(source.parent)
    except BaseException:
        if not exchanged:  # remove only the build this call made (never a payload swapped to its name)
            try:
                st = tmp.lstat()
                if (st.st_dev, st.st_ino) == ident:
                    shutil.rmtree(tmp, ignore_errors=True)
            except OSError:
                pass
        raise
    return source
