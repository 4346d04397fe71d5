"""The main job: train on Fashion-MNIST, unlearn at several ratios, compare with retraining.

    python experiments/main/run.py [--data fashion_mnist] [--model logreg] [--ratios 0.01,0.1,0.3,0.5]
                                   [--method mini] [--workdir DIR] [--update-reference]

It drives the real CLI (`mini-unlearn train` once, then `mini-unlearn unlearn --compare-retrain`
per ratio, then one whole `unlearn` command of the method and one of `retrain`, timed end to
end), prints progress for every phase and ends with the comparison table.

Run directories, reports and the table go to --workdir (default
``$XDG_CACHE_HOME/mini-unlearn/runs/main``, i.e. ``~/.cache/...``), never into the repository.
``--update-reference`` also rewrites the committed reference table in
``experiments/main/results/<data>-<model>`` (``fashion_mnist-logreg`` for the defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def default_workdir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mini-unlearn" / "runs" / "main"


class Progress:
    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def start(self, what: str) -> None:
        el = time.perf_counter() - self.t0
        eta = f", about {el / self.done * (self.total - self.done):.0f}s left" if self.done else ""
        print(f"[main {self.done + 1}/{self.total}] {what}  ({el:.0f}s elapsed{eta})", file=sys.stderr, flush=True)

    def finish(self) -> None:
        self.done += 1


def cli(*args: str) -> tuple[int, float]:
    """Run ``mini-unlearn ARGS`` in a fresh process; return its exit code and wall seconds."""
    cmd = [sys.executable, "-m", "mini_unlearn_jax", *args]
    print("  $ mini-unlearn " + " ".join(args), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    return rc, time.perf_counter() - t0


def table(rows: list[dict], e2e: dict | None) -> str:
    head = ("| ratio | removed | converged | test acc (retrain / original) | rel param error | KL ratio | "
            "unlearn s | refresh s | retrain s | time ratio |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if not r.get("converged"):
            lines.append(f"| {r['ratio']:.2f} | {r['n_removed']} | False ({r['reason']}) |" + " |" * 7)
            continue
        lines.append(
            f"| {r['ratio']:.2f} | {r['n_removed']} | True | {r['test_acc']:.4f} ({r['retrain_test_acc']:.4f} / "
            f"{r['original_test_acc']:.4f}) | {r['rel_param_error']:.3f} | {r['kl_ratio']:.3f} | "
            f"{r['unlearn_s']:.3f} | {r['refresh_s']:.3f} | {r['retrain_time_s']:.2f} | {r['time_ratio']:.4f} |")
    out = "\n".join(lines) + "\n"
    if e2e:
        out += (f"\nEnd to end, whole commands at ratio {e2e['ratio']} (process start, imports, loading, "
                f"compilation with a warm cache, the method, the refresh and writing the result): "
                f"`unlearn --method {e2e['method']}` {e2e['method_wall_s']:.1f} s, `unlearn --method retrain` "
                f"{e2e['retrain_wall_s']:.1f} s, ratio {e2e['method_wall_s'] / e2e['retrain_wall_s']:.3f}. "
                f"Training the model took {e2e['train_wall_s']:.1f} s end to end.\n")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion_mnist", help="data spec (see `mini-unlearn train --help`)")
    ap.add_argument("--model", default="logreg", choices=["logreg", "mlp"])
    ap.add_argument("--l2", default="1e-3")
    ap.add_argument("--ratios", default="0.01,0.1,0.3,0.5", help="comma-separated removal ratios")
    ap.add_argument("--method", default="mini")
    ap.add_argument("--seed", default="0")
    ap.add_argument("--workdir", type=Path, default=default_workdir(), help="where runs and reports go")
    ap.add_argument("--no-end-to-end", action="store_true", help="skip the two whole-command timings")
    ap.add_argument("--update-reference", action="store_true",
                    help="also rewrite the committed reference table under experiments/main/results/")
    args = ap.parse_args()
    try:
        import jax  # noqa: F401  (the CLI it drives runs in this same interpreter)

        import mini_unlearn_jax  # noqa: F401
    except ImportError as e:
        print(f"[main] error: this Python ({sys.executable}) lacks the project's packages ({e}). Set up once "
              "with `bash .ci/setup main`, then run `.venv/bin/python experiments/main/run.py`.", file=sys.stderr)
        return 1
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        ap.error(f"--ratios must be comma-separated numbers, got {args.ratios!r}")
    if not all(0 < r < 1 for r in ratios):
        ap.error(f"every ratio must lie strictly between 0 and 1, got {args.ratios}")

    tag = f"{args.data.replace(':', '_').replace('/', '_').replace(',', '_').replace('=', '')}-{args.model}"
    work = args.workdir / tag
    run = work / "trained"
    steps = 1 + len(ratios) + (0 if args.no_end_to_end else 2)
    prog = Progress(steps)
    print(f"[main] outputs go to {work}", file=sys.stderr, flush=True)
    prog.start(f"train {args.model} on {args.data}")
    if (run / "run.json").exists():
        print(f"  reusing the trained run {run} (delete it to retrain)", file=sys.stderr, flush=True)
        train_wall = json.loads((run / "run.json").read_text()).get("train_wall_s", float("nan"))
    else:
        if run.exists():
            print(f"[main] error: {run} exists but is not a trained run; move it away or choose another "
                  "--workdir", file=sys.stderr)
            return 1
        rc, train_wall = cli("train", "--data", args.data, "--model", args.model, "--l2", args.l2,
                             "--seed", args.seed, "--out", str(run))
        if rc != 0:
            return rc
    prog.finish()

    rows = []
    for ratio in ratios:
        prog.start(f"{args.method} at {ratio:.0%}, then retraining for reference")
        out = work / f"{args.method}-{ratio}"
        rc, _ = cli("unlearn", "--run", str(run), "--method", args.method, "--ratio", str(ratio),
                    "--seed", args.seed, "--compare-retrain", "--out", str(out), "--overwrite")
        if rc not in (0, 2):
            return rc
        rows.append(json.loads((out / "report.json").read_text()))
        prog.finish()

    e2e = None
    if not args.no_end_to_end:
        ratio = 0.1 if 0.1 in ratios else ratios[0]
        walls = {}
        for method in (args.method, "retrain"):
            prog.start(f"whole command: unlearn --method {method} at {ratio:.0%} (no reference)")
            rc, walls[method] = cli("unlearn", "--run", str(run), "--method", method, "--ratio", str(ratio),
                                    "--seed", args.seed, "--out", str(work / f"e2e-{method}"), "--overwrite")
            if rc != 0:
                return rc
            prog.finish()
        e2e = {"ratio": ratio, "method": args.method, "method_wall_s": walls[args.method],
               "retrain_wall_s": walls["retrain"], "train_wall_s": train_wall}

    import jax

    note = (f"\nCommand: `python experiments/main/run.py --data {args.data} --model {args.model} --l2 {args.l2} "
            f"--ratios {args.ratios} --method {args.method} --seed {args.seed}`  \n"
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} on "
            f"{jax.devices()[0].platform}; {time.strftime('%Y-%m-%d')}. `unlearn s` and `retrain s` exclude "
            "compilation; `refresh s` is the pass that readies the result for the next request; the time ratio "
            "is (unlearn s + refresh s) / retrain s, measured in the same command. KL ratio = KL(p_R||p_U) / "
            "KL(p_R||p_original) on the test set.\n")
    text = table(rows, e2e) + note
    title = f"# {args.method} on {args.data} ({args.model}, l2={args.l2})\n\n"
    (work / "table.md").write_text(title + text)
    (work / "reports.json").write_text(json.dumps({"rows": rows, "end_to_end": e2e}, indent=2))
    if args.update_reference:
        ref = HERE / "results" / tag
        ref.mkdir(parents=True, exist_ok=True)
        (ref / "table.md").write_text(title + text)
        (ref / "reports.json").write_text(json.dumps({"rows": rows, "end_to_end": e2e}, indent=2))
        print(f"[main] reference table updated: {ref}", file=sys.stderr)
    print(f"[main] done in {time.perf_counter() - prog.t0:.0f}s; table and reports in {work}\n", file=sys.stderr)
    print(title + text)
    return 0 if all(r["converged"] for r in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
