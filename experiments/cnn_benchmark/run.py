"""Run or resume the CNN benchmark under the Deep Unlearn / NeurIPS-challenge protocol.

    python experiments/cnn_benchmark/run.py                       # the CPU run: config.toml
    python experiments/cnn_benchmark/run.py --config experiments/cnn_benchmark/gpu.toml   # all 60,000 images

The protocol, the metrics and the report are documented in
``mini_unlearn_jax/app/harness/protocol.py`` and ``protocol_report.py``; the results land in the
config's ``out`` folder (``results.jsonl``, ``tuning.jsonl``, ``table.md``, ``gap_vs_time.png``).
A rerun resumes: rows already in ``results.jsonl`` are skipped.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from mini_unlearn_jax.app.harness.protocol import ProtocolConfig, run_protocol

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(HERE / "config.toml"), help="the benchmark's TOML file")
    ap.add_argument("--out", help="output folder (default: the config's out)")
    ap.add_argument("--seeds", type=int, nargs="+", help="model seeds (default: the config's)")
    ap.add_argument("--fresh", action="store_true", help="discard this output folder's earlier rows first")
    args = ap.parse_args(argv)
    overrides = {"out": os.path.abspath(args.out) if args.out else None, "seeds": args.seeds}
    cfg = ProtocolConfig.load(args.config, **overrides)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    run_protocol(cfg, fresh=args.fresh, command=command, log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
