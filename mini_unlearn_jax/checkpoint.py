"""Run directories: orbax checkpoints of a trained (or unlearned) model with its metadata.

Layout of a run directory::

    RUN_DIR/ckpt/0/          orbax CheckpointManager step 0, args.Composite of
        state                  params, opt_state, snapshots, stats (EKFAC or absent)
        meta                   JSON: model, l2, data spec + fingerprint, train config, ledger, ...
    RUN_DIR/run.json         the same metadata, for people and `mini-unlearn info`
    RUN_DIR/removed.npy      original training indices removed so far (the ledger's indices)

A run directory is written atomically: everything goes to a hidden sibling first, which is
renamed into place only once complete, so an interrupted write never leaves a directory
that loads. Existing runs are never overwritten unless the caller asks to, and never by
``train``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import curvature as cv
from .models import Objective, build_model, init_params, make_objective
from .snapshots import snapshot_buffer
from .training import TrainConfig, make_optimizer

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A run directory that is missing, incomplete or corrupted; the message says what to do."""


class Run(NamedTuple):
    params: Any
    opt_state: Any
    snapshots: Any
    stats: cv.EKFAC | None
    removed: np.ndarray  # original training indices removed so far (ledger order; removed.npy)
    meta: dict
    objective: Objective
    model: Any

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.meta["train_config"])


def _abstract(meta: dict):
    model = build_model(meta["model"], meta["num_classes"], hidden=meta.get("hidden", 256))
    objective = make_objective(model, meta["l2"])
    cfg = TrainConfig(**meta["train_config"])
    x0 = np.zeros(tuple(meta["input_shape"]), np.float32)
    params = init_params(model, x0, cfg.seed)
    tree = {
        "params": params,
        "opt_state": make_optimizer(cfg).init(params),
        "snapshots": snapshot_buffer(cfg.snapshots, cfg.snapshot_every).init(params),
    }
    if meta.get("has_stats"):
        d1 = int(np.prod(meta["input_shape"])) + 1
        c = meta["num_classes"]
        tree["stats"] = cv.EKFAC(jnp.zeros((d1, d1)), jnp.zeros((c, c)), jnp.zeros((d1, c)))
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype if not hasattr(a, "dtype") else a.dtype), tree), objective, model


def is_run(path: str | os.PathLike) -> bool:
    return (Path(path) / "run.json").exists() and (Path(path) / "ckpt").exists()


def save_run(path: str | os.PathLike, *, params, opt_state, snapshots, stats, removed, meta: dict,
             overwrite: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Write a run directory atomically. Refuses an existing non-empty ``path`` unless ``overwrite``.

    ``extra_files`` (name -> text) are written inside it before it appears."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} already exists and is not empty; choose a new directory"
                              + (" (or pass --overwrite)" if meta.get("kind") == "unlearned" else ""))
    if is_run(path) and overwrite and meta.get("kind") != "unlearned":
        raise FileExistsError(f"{path} holds a trained run, which is never overwritten; choose a new directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        removed = np.asarray(removed, np.int32)
        meta = dict(meta, format_version=FORMAT_VERSION, has_stats=stats is not None,
                    n_removed_total=int(removed.size))
        tree = {"params": params, "opt_state": opt_state, "snapshots": snapshots}
        if stats is not None:
            tree["stats"] = stats
        mgr = ocp.CheckpointManager(tmp / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
        mgr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
        mgr.wait_until_finished()
        mgr.close()
        np.save(tmp / "removed.npy", removed, allow_pickle=False)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / "run.json").write_text(json.dumps(meta, indent=2, default=_json_default))
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename a complete directory ``tmp`` to ``path``, replacing what is there."""
    pause = os.environ.get("MINI_UNLEARN_TEST_PAUSE_BEFORE_RENAME")  # lets a test kill us mid-save
    if pause:
        time.sleep(float(pause))
    if path.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, trash / "old")
        os.replace(tmp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, path)


def write_files_atomic(path: str | os.PathLike, files: dict[str, str], overwrite: bool = False) -> Path:
    """Write a directory holding only ``files`` (e.g. a failed run's report) atomically."""
    path = Path(path).absolute()
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} already exists and is not empty; choose a new directory (or pass --overwrite)")
    if is_run(path) and read_meta(path).get("kind") == "trained":
        raise FileExistsError(f"{path} holds a trained run, which is never overwritten; choose a new directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        for name, text in files.items():
            (tmp / name).write_text(text)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _json_default(o):
    if isinstance(o, np.integer | np.floating):
        return o.item()
    if isinstance(o, np.ndarray | jax.Array):
        return np.asarray(o).tolist()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give the --out directory of a `mini-unlearn train` (or unlearn) run")
    if not is_run(path):
        raise CheckpointError(f"{path} is not a run directory (no run.json/ckpt); it may be incomplete -- retrain into a new directory")
    try:
        meta = json.loads((path / "run.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/run.json is unreadable or corrupted ({e}); the run cannot be used, retrain it") from e
    for key in ("model", "num_classes", "input_shape", "l2", "train_config", "data_spec", "data_fingerprint"):
        if key not in meta:
            raise CheckpointError(f"{path}/run.json lacks {key!r}; it was not written by this version of mini-unlearn")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format_version')}, this version reads {FORMAT_VERSION}")
    return meta


def load_run(path: str | os.PathLike) -> Run:
    """Restore a run directory (read only: nothing in it is modified)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    meta = read_meta(path)
    abstract, objective, model = _abstract(meta)
    try:
        mgr = ocp.CheckpointManager(path / "ckpt", options=ocp.CheckpointManagerOptions(read_only=True))
        step = mgr.latest_step()
        if step is None:
            raise CheckpointError(f"{path}/ckpt holds no complete checkpoint; retrain into a new directory")
        restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        mgr.close()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: the checkpoint is truncated or corrupted ({type(e).__name__}: {str(e)[:200]}); "
                              "retrain into a new directory") from e
    state = restored["state"]
    leaves = jax.tree.leaves(state["params"])
    if not all(bool(jnp.all(jnp.isfinite(a))) for a in leaves):
        raise CheckpointError(f"{path}: the saved parameters hold NaN/inf; the checkpoint is corrupted")
    stats = state.get("stats")
    if stats is not None and not isinstance(stats, cv.EKFAC):
        stats = cv.EKFAC(*stats) if isinstance(stats, list | tuple) else cv.EKFAC(**stats)
    try:
        removed = np.load(path / "removed.npy", allow_pickle=False).astype(np.int32)
    except Exception as e:
        raise CheckpointError(f"{path}/removed.npy (the deletion ledger's indices) is missing or corrupted ({e})") from e
    if removed.shape != (int(meta.get("n_removed_total", 0)),):
        raise CheckpointError(f"{path}/removed.npy holds {removed.size} indices but run.json records "
                              f"{meta.get('n_removed_total')}; the run is corrupted")
    return Run(state["params"], state["opt_state"], state["snapshots"], stats, removed, meta, objective, model)
