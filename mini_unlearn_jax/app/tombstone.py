"""Reading a retired run, and finishing the deletion an interrupted retire left pending.

A retired run (see retire.py for how a run is retired) keeps only what documents its deletion::

    RUN/run.json         the old metadata with kind "retired" and a "retired" record; the ledger stays
    RUN/removed.npy      the ledger's indices, as before
    RUN/tombstone.json   {"retired_at", "reason", "successor", "kind_before", "deleted", "pending"}
    RUN/.mini-unlearn    marker, kind "retired" (never replaced by --overwrite, never loaded)

``pending`` names the hidden sibling ``.RUN.retire-XXXX`` the old payload was moved to by the
atomic exchange; if the process died before deleting it, :func:`finish_retire` deletes what is
left -- only if its marker is this tool's and it holds nothing the marker does not list. Reading
a retired run with :func:`~checkpoint.read_meta` / :func:`~checkpoint.load_run` raises
:func:`retired_error`'s :class:`RetiredRunError`, after finishing such a deletion.

Imports only markers.py (and the standard library), so that checkpoint.py can use it and
retire.py, which imports checkpoint.py, can build on it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .markers import (
    MARKER_FORMAT,
    MARKER_NAME,
    CheckpointError,
    _describe,
    _foreign_entries,
    read_marker,
)

RETIRED_KIND = "retired"
TOMBSTONE_NAME = "tombstone.json"
RETIRABLE_KINDS = ("trained", "unlearned")


class RetiredRunError(CheckpointError):
    """A run that was retired: its model is deleted, only its ledger and tombstone remain.
    ``meta`` is its run.json (ledger included), ``tombstone`` its tombstone.json."""

    def __init__(self, path: Path, meta: dict, tombstone: dict, note: str | None = None):
        self.path, self.meta, self.tombstone, self.note = path, meta, tombstone, note
        msg = (f"{path} was retired on {tombstone.get('retired_at')} ({tombstone.get('reason')}); its successor "
               f"is {tombstone.get('successor')}. Its parameters, buffers and statistics are deleted; "
               f"`mini-unlearn info {path}` shows its deletion ledger -- use the successor instead")
        super().__init__(msg + (f". Note: {note}" if note else ""))


def _trash_prefix(path: Path) -> str:
    """The name prefix of the hidden siblings a retire of ``path`` builds in and moves the old payload to."""
    return f".{path.name}.retire-"


def _read_json(p: Path) -> dict:
    try:
        out = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p} is missing or unreadable ({e})") from e
    if not isinstance(out, dict):
        raise CheckpointError(f"{p} is not a JSON object")
    return out


def read_retired(path: str | os.PathLike) -> tuple[dict, dict] | None:
    """``(meta, tombstone)`` of a retired run (run.json and tombstone.json), or None if ``path``
    is not one. Reads only; ``mini-unlearn info`` uses it to show a retired run's ledger."""
    path = Path(path).absolute()
    marker = read_marker(path)
    if marker is None or marker["kind"] != RETIRED_KIND:
        return None
    return _read_json(path / "run.json"), _read_json(path / TOMBSTONE_NAME)


# -- finishing an interrupted retire ------------------------------------------------------------
# (_fsync_dir and _delete_owned have twins in retire.py, which retire_run uses for its own steps;
# keep the two pairs in step.)


def _fsync_dir(path: Path) -> None:
    """Make a rename or deletion inside directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _owned_payload(trash: Path, kinds: tuple[str, ...]) -> tuple[dict | None, list[str]]:
    """The marker of ``trash`` if it is a directory of ours of one of ``kinds``, and its foreign entries."""
    if os.path.islink(trash) or not trash.is_dir():
        return None, []
    marker = read_marker(trash)
    if marker is None or marker["kind"] not in kinds or marker.get("format_version") != MARKER_FORMAT:
        return None, []
    return marker, _foreign_entries(trash, marker)


def _delete_owned(trash: Path) -> None:
    """Delete a directory of ours entry by entry and its marker last, so that a deletion cut short
    leaves a directory whose marker still says it is ours (and a later call can finish it)."""
    for entry in sorted(os.listdir(trash)):
        if entry == MARKER_NAME:
            continue
        p = trash / entry
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            os.unlink(p)
    os.unlink(trash / MARKER_NAME)
    os.rmdir(trash)


def _clean_stale_builds(path: Path, pending: str | None) -> str | None:
    """Delete what an interrupted retire of ``path`` left next to it: the old payload named by the
    tombstone (``pending``), and retired builds never exchanged in (a ``.NAME.retire-*`` sibling
    that is empty or marked "retired"). Only directories of ours holding only what their marker
    lists are deleted; returns a sentence about the pending payload if it had to be left."""
    note, deleted = None, False
    for sib in sorted(path.parent.glob(_trash_prefix(path) + "*")):
        if sib.name == pending:
            marker, foreign = _owned_payload(sib, RETIRABLE_KINDS)
            if marker is None:
                note = f"{sib} (the old payload) is no longer marked as written by mini-unlearn and was left in place"
            elif foreign:
                note = (f"{sib} (the old payload) also holds entries mini-unlearn did not write "
                        f"({_describe(foreign)}) and was left in place: move those out and delete it yourself")
            else:
                _delete_owned(sib)
                deleted = True
            continue
        try:
            if not sib.is_symlink() and sib.is_dir() and not os.listdir(sib):
                os.rmdir(sib)  # a build cut short before its marker; rmdir removes only an empty directory
                deleted = True
                continue
        except OSError:
            continue
        marker, foreign = _owned_payload(sib, (RETIRED_KIND,))
        if marker is not None and not foreign:
            _delete_owned(sib)
            deleted = True
    if deleted:
        _fsync_dir(path.parent)
    return note


def finish_retire(path: str | os.PathLike) -> str | None:
    """Finish an interrupted retire of the retired run ``path``: delete the old payload its
    tombstone names as pending (and retired builds never exchanged in), if they are ours and
    hold nothing else. Returns None when nothing of the old run is left, else a sentence saying
    what was left in place and why. Called by retire_run and by read_meta/load_run of a retired run."""
    path = Path(path).absolute()
    if read_retired(path) is None:
        raise CheckpointError(f"{path} is not a retired run")
    tomb = _read_json(path / TOMBSTONE_NAME)
    pending = tomb.get("pending")
    if not isinstance(pending, str) or not pending.startswith(_trash_prefix(path)) or "/" in pending:
        pending = None
    return _clean_stale_builds(path, pending)


def retired_error(path: str | os.PathLike) -> RetiredRunError:
    """The error read_meta/load_run raise for a retired run (after finishing a pending deletion)."""
    path = Path(path).absolute()
    meta, tomb = read_retired(path)
    try:
        note = finish_retire(path)
    except OSError as e:
        note = f"the old payload {tomb.get('pending')} could not be deleted yet ({e})"
    return RetiredRunError(path, meta, tomb, note)
