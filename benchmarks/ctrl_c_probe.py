"""Does the CLI stop cleanly on Ctrl-C whenever it arrives? SIGINT at random times, many runs.

    python benchmarks/ctrl_c_probe.py [--runs 20] [--seed 0]

Each run starts ``mini-unlearn train`` on a long synthetic MLP job (with Python's own Ctrl-C
handler installed, as in an interactive shell) and sends SIGINT either a random 0.5-6 s after
start ("start": start-up, imports and compilation included) or a random 0-3 s after the first
progress line ("training"). A run passes if the process exits within 60 s with code 130, says
"interrupted" without a traceback, and leaves nothing in its output directory's parent. A run
that does not exit is reported as a hang, with the Python stacks of all its threads
(faulthandler, on SIGABRT). Nothing is written outside a temporary directory it removes.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAUNCH = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
          "sys.argv = ['mini-unlearn'] + sys.argv[1:]; runpy.run_module('mini_unlearn_jax', run_name='__main__')")
ARGS = ["train", "--data", "synthetic:n=20000,d=50,classes=5", "--model", "mlp", "--steps", "100000"]


def one_run(rng: random.Random, tmp: Path) -> dict:
    out = tmp / "r"
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, *ARGS, "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    phase, t0 = rng.choice(["start", "training"]), time.time()
    if phase == "start":
        delay = rng.uniform(0.5, 6.0)
        time.sleep(delay)
    else:
        line = ""
        while "step" not in line and time.time() - t0 < 120:
            line = proc.stderr.readline()
        delay = rng.uniform(0.0, 3.0)
        time.sleep(delay)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
        _, err = proc.communicate()
        return {"phase": phase, "delay_s": round(delay, 2), "sent_at_s": round(sent - t0, 2), "result": "hang",
                "stderr_tail": err[-3000:]}
    ok = (proc.returncode == 130 and "interrupted" in err and "Traceback" not in err and not out.exists()
          and not list(tmp.glob(".*")))
    return {"phase": phase, "delay_s": round(delay, 2), "sent_at_s": round(sent - t0, 2),
            "exit_s": round(time.time() - sent, 2), "code": proc.returncode, "result": "ok" if ok else "bad",
            **({} if ok else {"stderr_tail": err[-3000:]})}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="seeds the phases and delays")
    args = p.parse_args()
    rng = random.Random(args.seed)
    counts = {"ok": 0, "bad": 0, "hang": 0}
    for i in range(args.runs):
        tmp = Path(tempfile.mkdtemp(prefix="ctrl-c-probe-"))
        try:
            r = one_run(rng, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        counts[r["result"]] += 1
        print(f"[{i + 1}/{args.runs}] {r['phase']:8s} SIGINT at {r['sent_at_s']:5.2f} s: {r['result']}"
              + (f", exit {r['exit_s']:.2f} s later" if "exit_s" in r else ""), flush=True)
        if "stderr_tail" in r:
            print(r["stderr_tail"], flush=True)
    print(f"{counts['ok']} of {args.runs} clean; {counts['bad']} unclean exits; {counts['hang']} hangs")
    return 0 if counts["ok"] == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
