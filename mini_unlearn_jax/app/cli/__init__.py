"""The ``mini-unlearn`` command line: train, unlearn, info, attack, audit.

    mini-unlearn train --data SPEC --model {logreg,mlp,cnn} [--l2 FLOAT] [--penalize-bias] [--hidden INT] [--seed INT]
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
import sys

from . import runs, train, unlearn
from .attack import add_attack_parser, cmd_attack
from .common import (
    EXIT_AUDIT_FAIL,
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_NOT_CONVERGED,
    HelpFormatter,
    UsageError,
    log,
    nonmember_indices,
    read_forget_file,
)


def build_parser() -> argparse.ArgumentParser:
    from ... import __version__

    p = argparse.ArgumentParser(prog="mini-unlearn", description="Train, unlearn and evaluate (Mini-Unlearning in JAX).",
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{train,unlearn,info,attack,audit,retire}")
    train.add_parser(sub)
    unlearn.add_parser(sub)
    add_attack_parser(sub)
    runs.add_info_parser(sub)
    runs.add_retire_parser(sub)
    runs.add_audit_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..checkpoint import CheckpointError
    from ..data import DataError
    from ..runtime import enable_compilation_cache, interrupts_not_lost, quiet_third_party_logs

    try:
        with interrupts_not_lost():
            quiet_third_party_logs()
            args.compile_cache_dir = None
            if args.cmd in ("train", "unlearn", "attack"):
                cache = enable_compilation_cache()
                args.compile_cache_dir = str(cache) if cache is not None else None
            cmd = {"train": train.cmd_train, "unlearn": unlearn.cmd_unlearn, "info": runs.cmd_info, "retire": runs.cmd_retire,
                   "attack": cmd_attack, "audit": runs.cmd_audit}[args.cmd]
            return cmd(args)
    except (UsageError, DataError, CheckpointError, FileExistsError, ValueError) as e:
        print(f"mini-unlearn {args.cmd}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"\nmini-unlearn {args.cmd}: interrupted; nothing was written (outputs appear only when complete)",
              file=sys.stderr)
        return EXIT_INTERRUPTED


__all__ = ["EXIT_AUDIT_FAIL", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "EXIT_NOT_CONVERGED", "UsageError",
           "add_attack_parser", "build_parser", "cmd_attack", "log", "main", "nonmember_indices", "read_forget_file"]

if __name__ == "__main__":
    sys.exit(main())
