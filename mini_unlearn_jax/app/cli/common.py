"""What every subcommand shares: exit codes, progress messages, the usage error, the help format."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

EXIT_BAD_INPUT, EXIT_NOT_CONVERGED, EXIT_AUDIT_FAIL, EXIT_INTERRUPTED = 1, 2, 3, 130


def log(msg: str) -> None:
    """A progress message, on stderr (stdout carries each command's one summary line)."""
    print(f"[mini-unlearn] {msg}", file=sys.stderr, flush=True)


class UsageError(Exception):
    """Bad input on the command line: the message says what is wrong and what to do."""


def nonmember_indices(meta: dict, n_test: int) -> np.ndarray:
    """The test images the unlearning method never reads -- all but a trajectory run's held-out
    split: the test metrics of ``unlearn`` and an attack's non-members are computed on these."""
    from ..recipes import unread_test_indices

    return unread_test_indices(n_test, (meta.get("trajectory") or {}).get("val_indices", []))



def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


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



class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows an option's default where it has one that its help does not already state."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.required or any(action.default is v for v in (None, False, argparse.SUPPRESS))
                or "(default" in text or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


