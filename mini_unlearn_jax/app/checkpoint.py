"""Run directories: orbax checkpoints of a trained (or unlearned) model with its metadata.

Layout of a run directory::

    RUN_DIR/ckpt/0/          orbax CheckpointManager step 0, args.Composite of
        state                  params, opt_state, snapshots, stats (EKFAC or absent)
        meta                   JSON: model, l2, data spec + fingerprint, train config, ledger, ...
    RUN_DIR/run.json         the same metadata, for people and `mini-unlearn info`
    RUN_DIR/removed.npy      original training indices removed so far (the ledger's indices)

    RUN_DIR/.mini-unlearn    marker: JSON {"tool", "kind", "format_version", "entries"}

Two kinds of run: the CLI's (``meta["model"]`` is ``logreg`` or ``mlp``; :func:`load_run` rebuilds
the model, objective and abstract tree from the metadata) and *your own model* (any other
``model`` name, or none): :func:`save_run` records the objective's description, and
:func:`load_run` restores against the ``objective`` and parameter tree ``like`` you pass back,
refusing an objective whose loss, penalty or L2 coefficient differs from the saved one::

    mu.save_run("run", params=w, snapshots=buf, objective=obj, params0=w0, meta={"train_config": ...})
    run = mu.load_run("run", objective=obj, like=w0)      # in another process
    problem = run.problem(x, y)                           # -> mu.run_method(name, problem, forget)

A run directory is written by :func:`~atomic.write_dir_atomic` (atomic.py, which states the
protocol): built complete in a hidden sibling -- its ``ckpt/0`` committed by orbax's own rename
of ``0.orbax-checkpoint-tmp`` on finalize, so :func:`load_run` (``latest_step``) never sees a
half-written step -- then marked and renamed into place; ``--overwrite`` replaces only a
replaceable result of ours holding nothing else, by two renames that :func:`~atomic.recover`
finishes or undoes if interrupted. :func:`is_run` and :func:`read_meta` (so :func:`load_run`)
call it first.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..core import linalg as cv
from ..core.models import BUILTIN_MODELS, Objective, build_model, init_params, make_objective
from ..core.snapshots import TrajectoryState, snapshot_buffer
from ..core.training import TrainConfig, make_optimizer
from .atomic import has_run_files, recover, write_dir_atomic
from .markers import CheckpointError, read_marker
from .tombstone import RETIRED_KIND, retired_error

FORMAT_VERSION = 1


class Run(NamedTuple):
    """A restored run directory. ``model`` is the flax module of a CLI run (None for your own
    model); ``params0`` the saved initial parameters, if any; ``opt_state`` None when not saved."""

    params: Any
    opt_state: Any
    snapshots: Any
    stats: cv.EKFAC | None
    removed: np.ndarray  # original training indices removed so far (ledger order; removed.npy)
    meta: dict
    objective: Objective
    model: Any
    params0: Any = None
    trajectory: Any = None  # a TrajectoryState (trajectory buffer) when the run kept one
    heldout: Any = None  # (x_val, y_val) saved with your own model's trajectory (CLI runs save indices)
    profile: Any = None  # the trajectory's memorisation profile as saved (your own model's runs)

    @property
    def train_config(self) -> TrainConfig | None:
        """The recipe as data, when the run recorded one (CLI runs always do)."""
        cfg = self.meta.get("train_config")
        if cfg is None or self.meta.get("custom_optimizer"):  # your own optax optimizer: pass recipe= back
            return None
        return TrainConfig(**cfg)

    def problem(self, x, y, recipe=None, *, val=None):
        """The :class:`~mini_unlearn_jax.core.problem.Problem` of this run on its training data
        ``(x, y)`` (the rows still alive). ``recipe`` (a TrainConfig or a function, see Problem)
        replaces the recorded train_config. A CLI run without saved ``params0`` gets them from
        its model and seed, as training did. With a trajectory buffer and ``val`` (the held-out
        ``(x_val, y_val)`` recorded at training; a run of your own model saved them), ``extras
        ["trajectory"]`` is filled, so trajectory unlearning applies."""
        from ..core.problem import Problem
        from ..core.trajectory import TrajectoryData

        recipe = recipe if recipe is not None else self.train_config
        params0 = self.params0
        if params0 is None and self.model is not None:
            params0 = init_params(self.model, np.asarray(x[0]), self.train_config.seed)
        extras = {}
        val = val if val is not None else self.heldout
        if self.trajectory is not None and val is not None:
            profile = self.profile if self.profile is not None else self.meta.get("trajectory", {}).get("profile")
            extras["trajectory"] = TrajectoryData(self.trajectory, jnp.asarray(val[0]), jnp.asarray(val[1]),
                                                  None if profile is None else jnp.asarray(profile, jnp.float32))
        return Problem(self.objective, recipe, params0, self.params, self.snapshots, self.stats,
                       jnp.asarray(x), jnp.asarray(y), extras)


def _qualname(fn) -> str:
    # the name only: the same function is `__main__.f` in a script and `mymodule.f` when imported
    return getattr(fn, "__qualname__", type(fn).__name__)


def describe_objective(objective: Objective) -> dict:
    """What save_run records of an objective, and load_run checks against the one passed back."""
    return {"kind": objective.kind, "l2": float(objective.l2), "example_loss": _qualname(objective.example_loss),
            "l2_mask": _qualname(objective.l2_mask), "convex": bool(objective.convex)}


def _shape_tree(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype if hasattr(a, "dtype")
                                                       else np.asarray(a).dtype), tree)


def _abstract(meta: dict):
    model = build_model(meta["model"], meta["num_classes"], hidden=meta.get("hidden", 256))
    objective = make_objective(model, meta["l2"], penalize_bias=bool(meta.get("penalize_bias", False)))
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
    if meta.get("has_params0"):
        tree["params0"] = params
    if meta.get("trajectory"):
        K = len(meta["trajectory"]["schedule"])
        tree["trajectory"] = {"steps": np.zeros((K,), np.int32),
                              "params": jax.tree.map(lambda a: np.zeros((K,) + np.shape(a), a.dtype), params)}
    return _shape_tree(tree), objective, model


def _abstract_custom(meta: dict, like):
    """The abstract tree of a run of your own model, from the parameter tree ``like``."""
    params = _shape_tree(like)
    tree = {"params": params}
    if meta["snapshot_size"]:
        tree["snapshots"] = jax.eval_shape(snapshot_buffer(int(meta["snapshot_size"])).init, params)
    if meta.get("has_params0"):
        tree["params0"] = params
    if meta.get("has_stats"):
        tree["stats"] = cv.EKFAC(*(jax.ShapeDtypeStruct(tuple(s), np.float32) for s in meta["stats_shapes"]))
    if meta.get("trajectory"):
        K = int(meta["trajectory"]["size"])
        stack = lambda a: jax.ShapeDtypeStruct((K,) + tuple(a.shape), a.dtype)
        tree["trajectory"] = {"steps": jax.ShapeDtypeStruct((K,), np.int32), "params": jax.tree.map(stack, params),
                              "profile": jax.ShapeDtypeStruct((K,), np.float32)}
        h = meta["trajectory"]["heldout"]
        tree["heldout"] = {k: jax.ShapeDtypeStruct(tuple(h[k]["shape"]), np.dtype(h[k]["dtype"])) for k in ("x", "y")}
    return tree


def is_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a run (run.json and ckpt), after recovering an interrupted replacement."""
    recover(path)
    return has_run_files(Path(path))


def save_run(path: str | os.PathLike, *, params, snapshots=None, stats=None, removed=(), meta: dict | None = None,
             opt_state=None, params0=None, objective: Objective | None = None, trajectory=None,
             heldout=None, profile=None, recipe: TrainConfig | None = None,
             overwrite: bool | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write a run directory atomically (write_dir_atomic; its marker's kind is ``meta["kind"]``).

    For your own model: pass ``objective`` (its description is recorded and checked when the run
    is loaded back), ``params0`` (retraining starts from it), ``recipe`` (a TrainConfig; with
    your own optax optimizer its other fields are recorded and :func:`load_run`'s caller passes
    it back), ``opt_state`` (restored when load_run is given its abstract tree), ``trajectory``
    with the ``heldout`` set ``(x_val, y_val)`` it reads and its ``profile`` (what
    :func:`~mini_unlearn_jax.core.unlearning.make_problem` computed; see :func:`save_problem`),
    and, in ``meta``, any JSON-able fields you like. The CLI's MLP runs keep a ``trajectory``
    too, with its schedule, held-out indices and profile in ``meta["trajectory"]``. ``overwrite`` as in check_output_dir: only a replaceable result of this tool
    holding nothing else is ever replaced, a trained run never. ``extra_files`` (name -> text)
    are written inside it before it appears."""
    import orbax.checkpoint as ocp

    meta = dict(meta or {})
    builtin = meta.get("model") in BUILTIN_MODELS
    if recipe is not None:
        cfg = dataclasses.asdict(recipe)
        if not isinstance(recipe.optimizer, str):  # your own optax optimizer: recorded by name only
            cfg["optimizer"] = _qualname(recipe.optimizer)
            meta["custom_optimizer"] = True
        meta["train_config"] = cfg
    if not builtin:
        meta.setdefault("model", "custom")
        if objective is None:
            raise ValueError("save_run: for your own model pass objective= so that load_run can check that the "
                             "objective you restore against is the one the model was trained with")
        if trajectory is not None:
            if heldout is None or profile is None:
                raise ValueError("save_run: a trajectory buffer is saved with the held-out set it reads and its "
                                 "profile: pass heldout=(x_val, y_val) and profile= (save_problem does both)")
            meta["trajectory"] = {"size": int(np.shape(trajectory.steps)[0]),
                                  "heldout": {k: {"shape": list(np.shape(a)), "dtype": str(np.asarray(a).dtype)}
                                              for k, a in zip(("x", "y"), heldout, strict=True)}}
    elif (trajectory is not None) != bool(meta.get("trajectory")):
        raise ValueError("save_run: a CLI run's trajectory buffer goes with its schedule, held-out indices and "
                         "profile in meta['trajectory']")
    if builtin and opt_state is None:
        raise ValueError("save_run: a CLI run saves its optimizer state")
    if stats is not None and not isinstance(stats, cv.EKFAC):
        raise ValueError(f"save_run: stats must be EKFAC statistics (fit_stats) or None, got {type(stats).__name__}")
    removed = np.asarray(removed, np.int32).reshape(-1)
    meta = dict(meta, format_version=FORMAT_VERSION, has_stats=stats is not None, has_params0=params0 is not None,
                has_opt_state=opt_state is not None, n_removed_total=int(removed.size),
                snapshot_size=0 if snapshots is None else int(np.shape(snapshots.steps)[0]))
    if builtin and snapshots is None:
        raise ValueError("save_run: a CLI run saves its snapshot buffer")
    if objective is not None:
        meta["objective"] = describe_objective(objective)
    if stats is not None:
        meta["stats_shapes"] = [list(np.shape(a)) for a in stats]
    try:
        json.dumps(meta, default=_json_default)
    except TypeError as e:
        raise ValueError(f"save_run: meta must be JSON-serialisable ({e})") from e

    def fill(tmp: Path) -> None:
        tree = {"params": params}
        if snapshots is not None:
            tree["snapshots"] = snapshots
        if builtin:
            tree["opt_state"] = opt_state
        if stats is not None:
            tree["stats"] = stats
        if params0 is not None:
            tree["params0"] = params0
        if trajectory is not None:
            tree["trajectory"] = {"steps": trajectory.steps, "params": trajectory.params}
            if not builtin:
                tree["trajectory"]["profile"] = jnp.asarray(profile, jnp.float32)
                tree["heldout"] = {"x": jnp.asarray(heldout[0]), "y": jnp.asarray(heldout[1])}
        items = {"state": ocp.args.StandardSave(tree),
                 "meta": ocp.args.JsonSave(json.loads(json.dumps(meta, default=_json_default)))}
        if opt_state is not None and not builtin:  # its own item: restored only when its structure is given
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        mgr = ocp.CheckpointManager(tmp / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
        mgr.save(0, args=ocp.args.Composite(**items))
        mgr.wait_until_finished()
        committed = mgr.latest_step() == 0  # orbax renamed 0.orbax-checkpoint-tmp to 0 on finalize
        mgr.close()
        if not committed:
            raise CheckpointError(f"orbax did not commit the checkpoint of {path}; nothing was written")
        np.save(tmp / "removed.npy", removed, allow_pickle=False)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / "run.json").write_text(json.dumps(meta, indent=2, default=_json_default))

    return write_dir_atomic(path, fill, kind=str(meta.get("kind") or "run"), overwrite=overwrite)


def _json_default(o):
    if isinstance(o, np.integer | np.floating):
        return o.item()
    if isinstance(o, np.ndarray | jax.Array):
        return np.asarray(o).tolist()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_meta(path: str | os.PathLike) -> dict:
    """The metadata (run.json) of a run directory, checked; CheckpointError if it is not one."""
    path = Path(path)
    recover(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give the --out directory of a `mini-unlearn train` (or unlearn) run")
    marker = read_marker(path)
    if marker is not None and marker["kind"] == RETIRED_KIND:  # its model is deleted: say so, and by whom replaced
        raise retired_error(path)  # (after finishing a deletion an interrupted retire left pending)
    if not is_run(path):
        raise CheckpointError(f"{path} is not a run directory (no run.json/ckpt); it may be incomplete -- retrain into a new directory")
    try:
        meta = json.loads((path / "run.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/run.json is unreadable or corrupted ({e}); the run cannot be used, retrain it") from e
    required = ("model", "num_classes", "input_shape", "l2", "train_config", "data_spec", "data_fingerprint")
    for key in required if meta.get("model") in BUILTIN_MODELS else ("model", "snapshot_size"):
        if key not in meta:
            raise CheckpointError(f"{path}/run.json lacks {key!r}; it was not written by this version of mini-unlearn")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format_version')}, this version reads {FORMAT_VERSION}")
    return meta


def load_run(path: str | os.PathLike, *, objective: Objective | None = None, like=None, opt_like=None) -> Run:
    """Restore a run directory (read only: nothing in it is modified).

    A CLI run rebuilds its model and objective from the metadata. A run of your own model needs
    ``objective`` (checked against the description save_run recorded) and ``like``, your
    parameter tree or its abstract version (``jax.eval_shape`` of your init), which fixes the
    structure the arrays are restored into; its optimizer state is restored when ``opt_like``
    gives its structure (``jax.eval_shape(optimizer.init, like)``), else ``Run.opt_state`` is None."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    meta = read_meta(path)
    if meta["model"] in BUILTIN_MODELS:
        abstract, built, model = _abstract(meta)
        objective = objective if objective is not None else built
    else:
        if objective is None or like is None:
            raise CheckpointError(f"{path} holds your own model ({meta['model']!r}), which cannot be rebuilt from its "
                                  "metadata: load it with load_run(path, objective=<your Objective>, like=<your "
                                  "parameters or their abstract tree>)")
        abstract, model = _abstract_custom(meta, like), None
    saved = meta.get("objective")
    if saved is not None:
        given = describe_objective(objective)
        diff = {k: (saved[k], given[k]) for k in saved if k in given and saved[k] != given[k]}
        if diff:
            raise CheckpointError(f"{path} was trained with a different objective: " + "; ".join(
                f"{k} saved {a!r}, given {b!r}" for k, (a, b) in diff.items()) + " -- pass the objective it was "
                "trained with (same example_loss, l2_mask and l2)")
    try:
        mgr = ocp.CheckpointManager(path / "ckpt", options=ocp.CheckpointManagerOptions(read_only=True))
        step = mgr.latest_step()
        if step is None:
            raise CheckpointError(f"{path}/ckpt holds no complete checkpoint; retrain into a new directory")
        items = {"state": ocp.args.StandardRestore(abstract)}
        if meta.get("has_opt_state") and opt_like is not None and meta["model"] not in BUILTIN_MODELS:
            items["opt_state"] = ocp.args.StandardRestore(_shape_tree(opt_like))
        restored = mgr.restore(step, args=ocp.args.Composite(**items))
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
    trajectory = heldout = profile = None
    if "trajectory" in state:
        trajectory = TrajectoryState(state["trajectory"]["steps"], state["trajectory"]["params"], ())
        profile = state["trajectory"].get("profile")
    if "heldout" in state:
        heldout = (state["heldout"]["x"], state["heldout"]["y"])
    opt_state = state.get("opt_state")
    if "opt_state" in items:
        opt_state = restored["opt_state"]
    return Run(state["params"], opt_state, state.get("snapshots"), stats, removed, meta, objective, model,
               state.get("params0"), trajectory, heldout, profile)


def save_problem(path: str | os.PathLike, problem, *, opt_state=None, meta: dict | None = None,
                 overwrite: bool | None = None) -> Path:
    """Save what :func:`~mini_unlearn_jax.core.unlearning.unlearn` reads of your own model --
    parameters, ``params0``, the snapshot buffer, the curvature statistics, the trajectory buffer
    with its held-out set and profile, the recipe -- and, if given, the optimizer state, as a run
    directory (:func:`save_run`). The training data is not saved: pass it back to
    ``load_run(...).problem(x, y)``, where a problem restored in another process unlearns to the
    same parameters, bit for bit, as the one in memory."""
    from ..core.training import TrainConfig as _TC

    traj = problem.extras.get("trajectory")
    recipe = problem.train_config if isinstance(problem.train_config, _TC) else None
    return save_run(path, params=problem.params, snapshots=problem.snapshots, stats=problem.stats,
                    params0=problem.params0, objective=problem.objective, opt_state=opt_state, recipe=recipe,
                    trajectory=None if traj is None else traj.state,
                    heldout=None if traj is None else (traj.x_val, traj.y_val),
                    profile=None if traj is None else traj.profile, meta=meta, overwrite=overwrite)
