"""Output safety: every output the tool writes appears complete or not at all, and nothing the
tool did not write is ever deleted or replaced.

Rule: every directory the tool writes carries MARKER_NAME (markers.py), a JSON file naming the
tool, the kind of output and every entry the tool wrote there. ``--overwrite`` replaces only a
directory whose marker says it is a replaceable result and that holds nothing else
(:func:`check_output_dir`); a trained run, a retired run, an attack report, a directory of
yours, a symlink, the current directory and its parents and the home directory never are.

Writing (:func:`write_dir_atomic`) is the pattern orbax-checkpoint uses for a checkpoint step
(``AtomicRenameTemporaryPath``: write ``0.orbax-checkpoint-tmp``, rename it to ``0`` on
finalize), one level up: the output is built complete in a hidden sibling ``.NAME.partial-XXXX``
(a run's ``ckpt/0`` inside it committed by orbax's own rename), gets its marker, and is renamed
to ``NAME`` with plain rename(2), which puts a directory only where nothing is or over an empty
directory. Replacing an earlier result at ``NAME`` takes two renames and a removal
(:func:`replace_by_renames`):

1. ``NAME`` -> ``.NAME.old-XXXX`` (the aside copy), which is checked again to be a replaceable
   result of ours holding nothing else; if it is not, it is renamed back and nothing changes;
2. ``.NAME.partial-XXXX`` -> ``NAME``: the new result is in place;
3. the aside copy is deleted entry by entry, its marker last (a removal cut short stays
   recognisably ours).

So ``NAME`` only ever holds the old complete result, the new complete result or -- between
renames 1 and 2 -- nothing, with the old result complete under its aside name. An error in a
step puts the old result back. A process killed between the steps is repaired by
:func:`recover`, which the next :func:`check_output_dir` (so the next save),
``checkpoint.is_run``, ``read_meta``/``load_run`` and ``retire`` of ``NAME`` call first: with
nothing at ``NAME``, a complete aside copy of ours is renamed back (the replacement did not
happen); with a result of ours at ``NAME``, an aside copy of ours holding nothing else is
deleted (the replacement happened), as is one whose removal had begun (entries its marker lists
are gone), and an empty one is removed. An aside copy not marked as ours,
or holding anything its marker does not list, is never deleted. retire.py swaps a run for its
retired directory by the same two renames (aside name ``.NAME.retire-XXXX``, the tombstone's
``pending``); with nothing at ``NAME``, a retired build whose tombstone names a complete old run
beside it marks the gap between its renames, and :func:`recover` renames the old run back and
deletes the build. One writer per output path at a time.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .markers import (
    MARKER_FORMAT,
    MARKER_NAME,
    TOOL,
    _describe,
    _foreign_entries,
    _walk_entries,
    _write_marker,
    read_marker,
)
from .tombstone import (
    RETIRABLE_KINDS,
    RETIRED_KIND,
    TOMBSTONE_NAME,
    _delete_owned,
    _owned_payload,
    _trash_prefix,
)

# kinds of output that `unlearn --overwrite` may replace; a trained run never is, nor an attack report
REPLACEABLE_KINDS = ("unlearned", "unlearn-report")
# never overwritten: a trained run, and a retired run (its deletion ledger and tombstone, see retire.py)
NEVER_REPLACED_KINDS = ("trained", RETIRED_KIND)
_KIND_WORDS = {"trained": "a trained run", "unlearned": "an unlearned result",
               "unlearn-report": "an unlearning report (a method that did not converge)",
               "attack": "a membership-inference attack report",
               "retired": "a retired run (its deletion ledger and tombstone)"}
PROBS_MARKER_KEY = "_mini_unlearn"  # the key that marks an --export-probs .npz as written by this tool
NEW_OUT = "choose a new --out (a new or empty directory)"


class OutputExistsError(FileExistsError):
    """An output path that must not be written or replaced; the message says what is there and what to do."""


def has_run_files(path: Path) -> bool:
    """Whether ``path`` holds a run's run.json and ckpt (checkpoint.is_run, after :func:`recover`)."""
    return (path / "run.json").exists() and (path / "ckpt").exists()


# -- recovering an interrupted replacement ----------------------------------------------------


def _aside_prefix(path: Path) -> str:
    """The name prefix of the aside copy an earlier result at ``path`` is renamed to while replaced."""
    return f".{path.name}.old-"


def _complete(path: Path, marker: dict) -> bool:
    """Every entry the marker lists is still there (no removal of it has begun)."""
    return set(marker["entries"]) <= set(_walk_entries(path))


def _siblings(path: Path, prefix: str) -> list[Path]:
    try:
        return sorted(path.parent / n for n in os.listdir(path.parent) if n.startswith(prefix))
    except OSError:
        return []


def _restore_retired_gap(path: Path) -> None:
    """Nothing at ``path``: if a retired build there names, as pending, a complete old run beside
    it, a retire died between its two renames: the old run is renamed back, the build deleted."""
    for build in _siblings(path, _trash_prefix(path)):
        marker, foreign = _owned_payload(build, (RETIRED_KIND,))
        if marker is None or foreign or not _complete(build, marker):
            continue
        try:
            pending = json.loads((build / TOMBSTONE_NAME).read_text()).get("pending")
        except (OSError, ValueError, AttributeError):
            continue
        old = path.parent / pending if isinstance(pending, str) and "/" not in pending else None
        if old is None or not pending.startswith(_trash_prefix(path)) or old == build:
            continue
        old_marker, _ = _owned_payload(old, RETIRABLE_KINDS)
        if old_marker is not None and _complete(old, old_marker) and not os.path.lexists(path):
            os.rename(old, path)
            with contextlib.suppress(OSError):  # the run is back; a later retire deletes the build
                _delete_owned(build)
            return


def recover(path: str | os.PathLike) -> None:
    """Finish or undo a replacement (or retire) of ``path`` that a process killed between its
    renames left behind (the protocol is in the module docstring). Never deletes anything not
    marked as ours or holding anything its marker does not list."""
    path = Path(path).absolute()
    present = os.path.lexists(path)
    for aside in _siblings(path, _aside_prefix(path)):
        marker, foreign = _owned_payload(aside, REPLACEABLE_KINDS)
        if marker is None:  # not ours, or a removal cut short after its marker: rmdir takes only an empty one
            with contextlib.suppress(OSError):
                os.rmdir(aside)
            continue
        if not present and _complete(aside, marker):
            os.rename(aside, path)  # the replacement never happened: the old result is back
            present = True
        elif not foreign and (not _complete(aside, marker) or (present and read_marker(path) is not None)):
            _delete_owned(aside)  # the new result went in (or a removal was cut short): finish the removal
    if not present:
        _restore_retired_gap(path)


# -- checks -----------------------------------------------------------------------------------


def _check_replaceable(path: Path, overwrite: bool | None, names: list[str]) -> None:
    """Raise OutputExistsError unless the non-empty directory ``path`` may be replaced."""
    marker = read_marker(path)
    if marker is None:
        if has_run_files(path):
            try:
                kind = json.loads((path / "run.json").read_text()).get("kind")
            except (OSError, ValueError, AttributeError):
                kind = None
            if kind == "trained":
                raise OutputExistsError(f"{path} holds a trained run, which is never overwritten; {NEW_OUT}")
            raise OutputExistsError(
                f"{path} holds a mini-unlearn run written without the {MARKER_NAME} marker (by an earlier version), "
                f"so it is not known to hold only what mini-unlearn wrote and is not replaced; {NEW_OUT}, or delete "
                "it yourself if you no longer need it")
        raise OutputExistsError(f"{path} already exists and is not empty (it holds {_describe(names)}) and was not "
                                f"written by mini-unlearn; it is never replaced -- {NEW_OUT}")
    kind = marker["kind"]
    what = _KIND_WORDS.get(kind, f"a mini-unlearn {kind!r} output")
    if kind in NEVER_REPLACED_KINDS:
        raise OutputExistsError(f"{path} holds {what}, which is never overwritten; {NEW_OUT}")
    if marker.get("format_version") != MARKER_FORMAT:
        raise OutputExistsError(f"{path} holds {what} written by another version of mini-unlearn (marker format "
                                f"{marker.get('format_version')!r}); it is not replaced -- {NEW_OUT}")
    if kind not in REPLACEABLE_KINDS:
        raise OutputExistsError(f"{path} already exists and is not empty: it holds {what}, which is never replaced; "
                                f"{NEW_OUT}")
    foreign = _foreign_entries(path, marker)
    if foreign:
        raise OutputExistsError(f"{path} holds {what} of mini-unlearn but also {len(foreign)} "
                                f"entr{'y' if len(foreign) == 1 else 'ies'} that mini-unlearn did not write "
                                f"({_describe(foreign)}); it is not replaced, so nothing of yours is lost -- move "
                                f"those out of it, or {NEW_OUT}")
    if not overwrite:
        raise OutputExistsError(f"{path} already holds {what}; choose a new --out"
                                + (" or pass --overwrite to replace it" if overwrite is False else ""))


def _protected(path: Path) -> str | None:
    """Why ``path`` (an existing directory) must never be written over, or None."""
    real = path.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd:
        return "is the current working directory"
    if real in cwd.parents:
        return "is a parent of the current working directory"
    try:
        if real == Path.home().resolve():
            return "is your home directory"
    except RuntimeError:  # no home directory known
        pass
    return None


def check_output_dir(path: str | os.PathLike, *, overwrite: bool | None = None) -> str:
    """Check that a directory output may be written at ``path``; raise OutputExistsError if not.

    ``overwrite``: None for a command without an --overwrite option (train, attack), else the
    option's value. Returns "absent" (nothing there), "empty" (an empty directory, which may be
    replaced: it loses nothing) or "replace" (a complete replaceable result of this tool holding
    nothing else, and ``overwrite`` is true). Refused: a symlink, a file, the current directory or
    one of its parents, the home directory, a non-empty directory this tool did not write (or
    that holds anything it did not write), a trained run, and any result unless ``overwrite``.
    An interrupted replacement of ``path`` is first recovered (:func:`recover`).
    """
    p = Path(path).absolute()
    recover(p)
    if os.path.islink(p):
        raise OutputExistsError(f"{path} is a symbolic link (to {os.readlink(p)}); mini-unlearn neither writes "
                                f"through nor replaces links -- {NEW_OUT}")
    if not os.path.lexists(p):
        return "absent"
    if not p.is_dir():
        raise OutputExistsError(f"{path} exists and is not a directory (a file or other entry mini-unlearn did not "
                                f"write); it is never replaced -- {NEW_OUT}")
    why = _protected(p)
    if why:
        raise OutputExistsError(f"{path} {why}; mini-unlearn never writes its output over it -- {NEW_OUT}")
    names = sorted(os.listdir(p))
    if not names:
        return "empty"
    _check_replaceable(p, overwrite, names)
    return "replace"


# -- the move into place ----------------------------------------------------------------------


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (briefly; not thread-safe)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def scratch_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A new hidden directory ``parent/prefix*`` to build an output in. If the block raises, it is
    removed -- only if its name still holds the directory made here (never what a rename put there)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    ident = (tmp.stat().st_dev, tmp.stat().st_ino)
    try:
        yield tmp
    except BaseException:
        try:
            st = tmp.lstat()
            if (st.st_dev, st.st_ino) == ident:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
        raise


def replace_by_renames(new: Path, path: Path, aside: Path, check: Callable[[Path], None]) -> None:
    """Renames 1 and 2 of the protocol (module docstring): ``path`` -> ``aside``, ``check(aside)``
    (raises if the old copy is no longer exactly ours), ``new`` -> ``path``. Any failure before
    ``new`` is in place renames the old copy back. The caller then deletes ``aside``."""
    os.rename(path, aside)
    try:
        check(aside)
        os.rename(new, path)
    except BaseException:
        if not os.path.lexists(path):
            os.rename(aside, path)
        raise


def _move_into_place(tmp: Path, path: Path, *, overwrite: bool | None = None) -> None:
    """Put the complete directory ``tmp`` at ``path``, re-checking ``path`` first (check_output_dir):
    a rename where nothing or an empty directory is, else the replacement of the module docstring."""
    if check_output_dir(path, overwrite=overwrite) != "replace":
        try:
            os.rename(tmp, path)  # a directory lands only where nothing or an empty directory is
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
            raise OutputExistsError(f"{path} appeared or changed while the output was being written; nothing "
                                    "was replaced -- choose a new --out") from e
        return

    def still_replaceable(old: Path) -> None:  # a file added since the check: the old result goes back
        try:
            _check_replaceable(old, overwrite, sorted(os.listdir(old)))
        except OutputExistsError as e:
            raise OutputExistsError(str(e).replace(str(old), str(path))) from None

    aside = path.with_name(_aside_prefix(path) + secrets.token_hex(6))
    replace_by_renames(tmp, path, aside, still_replaceable)
    try:
        _delete_owned(aside)
    except OSError:  # the new result is in place; recover() finishes the removal on the next touch
        pass


# -- writers ----------------------------------------------------------------------------------


def write_dir_atomic(path: str | os.PathLike, fill: Callable[[Path], None], *, kind: str,
                     overwrite: bool | None = None) -> Path:
    """Write a directory output atomically: ``fill(tmp)`` writes its files into a hidden sibling,
    which gets the marker (``kind``), normal permissions (0o777 & ~umask) and is then moved into
    place (see _move_into_place). ``path`` is checked by check_output_dir first, before any work,
    and again just before the move. An interrupted or failed write leaves ``path`` as it was."""
    path = Path(path).absolute()
    check_output_dir(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    with scratch_dir(path.parent, f".{path.name}.partial-") as tmp:
        fill(tmp)
        _write_marker(tmp, kind)
        os.chmod(tmp, 0o777 & ~_umask())
        _move_into_place(tmp, path, overwrite=overwrite)
    return path


def write_files_atomic(path: str | os.PathLike, files: dict[str, str], overwrite: bool | None = None, *,
                       kind: str = "unlearn-report") -> Path:
    """Write a directory holding only ``files`` (name -> text; by default a failed unlearning's
    report) atomically, under the same rules as checkpoint.save_run."""

    def fill(tmp: Path) -> None:
        for name, text in files.items():
            (tmp / name).write_text(text)

    return write_dir_atomic(path, fill, kind=kind, overwrite=overwrite)


def _probs_marker(path: Path) -> dict | None:
    """The marker of an --export-probs file this tool wrote, or None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files") or PROBS_MARKER_KEY not in z.files:
                return None
            marker = json.loads(str(z[PROBS_MARKER_KEY]))
            keys = sorted(k for k in z.files if k != PROBS_MARKER_KEY)
    except Exception:
        return None
    if not isinstance(marker, dict) or marker.get("tool") != TOOL or marker.get("keys") != keys:
        return None
    return marker


def check_output_file(path: str | os.PathLike, *, overwrite: bool | None = None) -> str:
    """Check that an .npz file (``--export-probs``) may be written at ``path``: "absent", or
    "replace" for a file this tool wrote (its marker key lists exactly its keys) when
    ``overwrite``. Anything else -- a foreign file, a directory, a symlink -- raises OutputExistsError."""
    p = Path(path).absolute()
    other = "choose another --export-probs path"
    if os.path.islink(p):
        raise OutputExistsError(f"{path} is a symbolic link (to {os.readlink(p)}); mini-unlearn neither writes "
                                f"through nor replaces links -- {other}")
    if not os.path.lexists(p):
        return "absent"
    if not p.is_file():
        raise OutputExistsError(f"{path} exists and is not a regular file; {other}")
    if _probs_marker(p) is None:
        raise OutputExistsError(f"{path} exists and was not written by mini-unlearn (it is not an --export-probs "
                                f"file of this tool); it is never replaced -- {other}")
    if not overwrite:
        raise OutputExistsError(f"{path} already holds probabilities exported by mini-unlearn; {other}"
                                + (" or pass --overwrite to replace it" if overwrite is False else ""))
    return "replace"


def _link_noreplace(tmp: Path, path: Path) -> None:
    """Put the file ``tmp`` at ``path`` only if nothing is there (FileExistsError otherwise): link(2)
    never replaces. Where hard links are unsupported: check, then rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "exists", str(path)) from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)


def write_npz_atomic(path: str | os.PathLike, arrays: dict[str, Any], *, overwrite: bool | None = None) -> Path:
    """Write ``arrays`` as an .npz at ``path`` (with a marker key) atomically: a complete temp file
    in the same directory, then a link that never replaces (or os.replace of a file this tool
    wrote, see check_output_file). Permissions 0o666 & ~umask."""
    path = Path(path).absolute()
    check_output_file(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    marker = {"tool": TOOL, "kind": "probs", "format_version": MARKER_FORMAT, "keys": sorted(arrays)}
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", suffix=".npz", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays, **{PROBS_MARKER_KEY: np.array(json.dumps(marker))})
        os.chmod(tmp, 0o666 & ~_umask())
        if check_output_file(path, overwrite=overwrite) == "absent":
            try:
                _link_noreplace(tmp, path)
            except FileExistsError as e:
                raise OutputExistsError(f"{path} appeared while it was being written; nothing was replaced -- "
                                        "choose another --export-probs path") from e
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
