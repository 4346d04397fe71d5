"""Running a grid: every cell not yet done, each row appended as it finishes, then the reports."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ...core import aot
from ..data import DataError
from .cells import _Cells, _train
from .config import (
    GridConfig,
    _from_fidelity_row,
    _is_grid_row,
    _previous_fidelity,
    append_row,
    check_row_store,
    key_of,
    load_rows,
)
from .reports import write_reports

# -- the run --------------------------------------------------------------------------------


def _default_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def run_grid(cfg: GridConfig, *, fresh: bool = False, command: str | None = None, log=None) -> list[dict]:
    """Run the grid ``cfg`` in this process and write its reports; returns every row of ``cfg.out``.

    Runs the cells not yet in ``cfg.out/results.jsonl`` (all of the config's cells when
    ``cfg.resume`` is False), appending each row as it is done. ``fresh`` discards the rows (and,
    for the fidelity report, the runs and models) of earlier runs first. ``command`` is recorded
    in the reports (default: this process's command line); ``log`` receives progress lines
    (default: stderr).
    """
    cfg.validate()  # methods registered since the config was built count; unregistered ones fail here
    log = log or _default_log
    command = _command_line() if command is None else command
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    sink_path = out / "results.jsonl"
    if fresh and sink_path.exists():
        check_row_store(sink_path, _is_grid_row)  # --fresh deletes only a row store this harness wrote
        sink_path.unlink()
    runs, models = _previous_fidelity(out) if cfg.report == "fidelity" and not fresh else ([], {})
    if cfg.report == "fidelity" and not sink_path.exists() and not fresh and (out / "results.json").exists():
        old = json.loads((out / "results.json").read_text())
        imported = [_from_fidelity_row(r, models) for r in old.get("rows", [])] if isinstance(old, dict) else []
        with open(sink_path, "w") as f:  # results.jsonl holds the rows from now on
            f.writelines(json.dumps(r, default=float) + "\n" for r in imported)
    rows = {key_of(r): r for r in load_rows(out)}
    cells = cfg.cells()
    done = {key_of(c) for c in cells} & set(rows)
    todo = [c for c in cells if key_of(c) not in done] if cfg.resume else cells
    log(f"grid: {len(cells)} cells, {len(done)} already done, {len(todo)} to run -> {out}"
        + ("" if cfg.resume else " (resume = false: every cell reruns)"))
    if earlier := [r for r in runs if not r.get("finished")]:
        log(f"grid: {len(earlier)} earlier run(s) did not finish")
    t0 = time.perf_counter()
    run = {"command": command, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "models": [m["model"] for m in cfg.models], "ratios": [str(r) for r in cfg.ratios],
           "methods": [str(m) for m in cfg.methods], "seeds": list(cfg.seeds),
           "machine": machine_info(), "library": library_version(), "finished": False}
    runs.append(run)
    incremental = cfg.report == "fidelity"  # cheap reports: rewritten after every cell

    def emit(row: dict) -> None:
        append_row(sink_path, row)
        rows.pop(key_of(row), None)
        rows[key_of(row)] = row
        run["wall_s"] = time.perf_counter() - t0
        if incremental:
            write_reports(cfg, list(rows.values()), command=command, runs=runs, models=models)

    model_cells, trained = None, None  # the trained model's cells (one in memory at a time), its (data, model, seed)
    skipped: set = set()
    finished = 0
    for cell in todo:
        spec = next(m for m in cfg.models if m["data"] == cell["data"] and m["model"] == cell["model"])
        tkey = (cell["data"], cell["model"], cell["seed"])
        if cell["data"] in skipped:
            continue
        if cfg.resume and key_of(cell) in {key_of(r) for r in load_rows(out)}:
            continue  # another worker on the same output directory did it
        if tkey != trained:
            if trained is not None and trained[:2] != tkey[:2]:
                aot.clear_compiled()  # another model: the previous one's programs go (another seed reuses them)
            model_cells, trained = None, None
            try:
                mdl = _train(spec, cell["seed"], log)
            except DataError as e:
                log(f"grid: skipping {cell['data']}: {e}")
                skipped.add(cell["data"])
                continue
            model_cells, trained = _Cells(mdl, cfg, emit, log), tkey
            rec = mdl.record
            models[f"{rec['model']}:{rec['n_train']}:{rec['seed']}"] = rec
        row = model_cells.run(cell)
        emit(row)
        finished += 1
        elapsed = time.perf_counter() - t0
        eta = elapsed / finished * (len(todo) - finished)
        bar = "#" * int(30 * finished / len(todo))
        res = (f"kl_ratio {row['kl_ratio']:.3g} time_ratio {row['time_ratio']:.3g}" if "kl_ratio" in row
               else row["reason"])
        log(f"[{bar:<30}] {finished}/{len(todo)}  {elapsed / 60:5.1f} min, ETA {eta / 60:5.1f} min  "
            f"{cell['model']} {cell['ratio']} seed {cell['seed']} {cell['method']}: {res}"
            + ("" if row["converged"] or "kl_ratio" not in row else f" ({row['reason']})"))
    run["finished"], run["wall_s"] = True, time.perf_counter() - t0
    end = library_version()
    if end.get("library_sha256") != run["library"].get("library_sha256"):
        run["library_at_end"] = end
        log(f"grid: the library's sources changed during this run ({run['library']} -> {end}); "
            "this run used the version imported at its start")
    all_rows = list(rows.values())
    write_reports(cfg, all_rows, command=command, runs=runs, models=models)
    log(f"grid: done in {run['wall_s']:.0f}s -> {out}")
    return all_rows


def machine_info() -> dict:
    """CPU, core count, memory, platform and the JAX version and devices of this process."""
    import jax
    import jaxlib

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        nproc = os.cpu_count() or 0
    mem = ""
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1])
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return {"nproc": nproc, "cpu": cpu, "memory": mem, "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "device": ", ".join(str(d) for d in jax.devices()), "backend": jax.default_backend()}


def library_version() -> dict:
    """Git commit of the checkout, whether the library has uncommitted changes, and a hash of its sources."""

    pkg = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        h.update(f.relative_to(pkg).as_posix().encode())
        h.update(f.read_bytes())
    info: dict[str, Any] = {"library_sha256": h.hexdigest()[:16]}
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=pkg.parent, capture_output=True, text=True,
                                        check=True).stdout.strip()
        info["git_commit"] = git("rev-parse", "--short", "HEAD")
        info["library_dirty"] = bool(git("status", "--porcelain", "--", pkg.name))
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


