"""The ownership marker of every directory this tool writes, and the error of a bad run directory.

Rule: never delete or replace anything this tool did not write. Every directory the tool writes
(run, unlearned result, failed unlearning's report, attack report, retired run) carries
``MARKER_NAME``, a JSON file ``{"tool", "kind", "format_version", "entries"}`` naming the tool,
the kind of output and every entry the tool wrote there. Whatever deletes or replaces one of
them (``--overwrite`` in checkpoint.py, retiring in retire.py, finishing a retire in
tombstone.py) first reads the marker (:func:`read_marker`) and checks that the directory holds
nothing else (:func:`_foreign_entries`).

The lowest module of the run-directory modules: it imports only the standard library, and
checkpoint.py, tombstone.py and retire.py import it (checkpoint.py re-exports its names).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MARKER_NAME = ".mini-unlearn"
MARKER_FORMAT = 1
TOOL = "mini-unlearn"


class CheckpointError(RuntimeError):
    """A run directory that is missing, incomplete or corrupted; the message says what to do."""


def _describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return shown


def _walk_entries(path: Path) -> list[str]:
    """Every file and directory below ``path`` (relative, '/'-separated), links not followed, marker excluded."""
    out = []
    for root, dirs, files in os.walk(path, followlinks=False):
        rel = Path(root).relative_to(path)
        out.extend((rel / n).as_posix() for n in dirs + files)
    return sorted(e for e in out if e != MARKER_NAME)


def read_marker(path: str | os.PathLike) -> dict | None:
    """The marker of a directory this tool wrote, or None (absent, unreadable or someone else's)."""
    try:
        marker = json.loads((Path(path) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("tool") != TOOL or not isinstance(marker.get("kind"), str) \
            or not isinstance(marker.get("entries"), list):
        return None
    return marker


def _write_marker(tmp: Path, kind: str) -> None:
    marker = {"tool": TOOL, "kind": kind, "format_version": MARKER_FORMAT, "entries": _walk_entries(tmp)}
    (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=1) + "\n")


def _foreign_entries(path: Path, marker: dict) -> list[str]:
    """Entries under ``path`` that the marker does not list (outermost only: 'code', not 'code/x.py')."""
    known = set(marker.get("entries", []))
    foreign = [e for e in _walk_entries(path) if e not in known]
    fset = set(foreign)
    return [e for e in foreign if not any(p.as_posix() in fset for p in Path(e).parents if p != Path("."))]
