"""A resumable experiment grid: datasets x models x methods x ratios x seeds.

The grid is a :class:`GridConfig`, written in a TOML file (see ``experiments/grid.toml`` and
``experiments/fidelity.toml``) or built in Python and passed to :func:`run_grid`::

    out = "experiments/results/grid"
    seeds = [0, 1, 2]
    ratios = [0.01, "5%", 0.1, "class0", "seq5x0.1"]   # fractions, percents, classK, seqMxF
    methods = ["mini", "mini-lite", "deltagrad", "deltagrad:lr=0.1"]
    mia = true
    [[models]]
    data = "fashion_mnist:n_train=10000"
    model = "logreg"
    l2 = 1e-3

Methods are the registered ones (:data:`~mini_unlearn_jax.core.methods.METHODS`, including any
registered at run time); ``NAME:KEY=VALUE[+KEY=VALUE...]`` passes options to ``run_method`` and
is reported under that label. A model entry takes ``data``, ``model``, ``l2``, ``hidden``,
``penalize_bias`` and any :class:`~mini_unlearn_jax.core.training.TrainConfig` field (``steps``,
``batch_size``, ...) replacing the model's default recipe, or ``recipe = NAME`` of
:data:`~mini_unlearn_jax.app.recipes.RECIPES` (whose settings the entry's keys replace); it is
trained by :func:`~mini_unlearn_jax.app.recipes.build_problem`.

Every cell (data, model, seed, ratio, method) becomes one row of ``results.jsonl``, appended as
soon as it is done (a later row of the same cell replaces an earlier one). With ``resume = true``
(the default) cells already there are skipped, so an interrupted run resumes where it stopped
and several workers with disjoint configs may share one output directory; with ``resume =
false`` every cell of the config reruns and replaces its earlier row (rows of other cells are
kept; ``fresh=True`` / ``--fresh`` discards them all). A method that raises, or does not apply
to the model (:func:`~mini_unlearn_jax.core.methods.applicable`), gets a row with
``converged = false`` and the reason. ``reference_rows = true`` adds a row for the reference
(``retrain``) of every (model, ratio) where it ran. A dataset that cannot be loaded here (e.g.
``tfds:higgs`` without a network) is skipped with a message.

Reports (``report``): ``"grid"`` writes ``results.csv``, ``results.json`` (the rows), a Markdown
table of mean ± std over seeds and PNG plots at the end of the run; ``"fidelity"`` writes after
every cell ``results.json`` (``{"runs", "models", "rows"}``: each run's command, machine and
library version, each trained model's recipe and cost), ``results.csv``, ``table.md`` (one
table per metric, every cell, the ``targets`` check) and ``fidelity_vs_time.png``.

Protocol: the forget set of ratio ``rho`` is ``sort(default_rng(seed).choice(n, round(rho n)))``
(as ``mini-unlearn unlearn --ratio rho --seed seed``); ``classK`` removes every training example
of class K; ``seqMxF`` runs M successive requests of fraction F of the original data (each on the
previous result) against retraining on the cumulative remainder. Every method is compared with
``retrain`` of the same cell except DeltaGrad, which replays its own (S)GD trajectory: its
reference is ``deltagrad_retrain`` with the same options and its original model
``info['own_original']``. In a row, ``kl_ratio`` = KL(p_R || p_U) / KL(p_R || p_original) on the
test set, ``rel_param_error`` = ||w_U - w_R|| / ||w_original - w_R||, ``time_ratio`` = the method's
time / its reference's (both without compilation, which ``compile_s`` reports), and
``memory_bytes`` the training history the method keeps: snapshot buffer + curvature statistics
for the mini variants, DeltaGrad's per-step cache, 0 for the others.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from ..core import aot
from ..core import methods as M
from ..core import registry as R
from ..core.snapshots import nbytes
from ..core.training import TrainConfig
from ..evaluation import attacks as A
from ..evaluation import metrics as mt
from ..evaluation.compare import compare
from . import recipes
from .data import DataError

METRICS = ("test_acc", "forget_acc", "retain_acc", "rel_param_error", "kl_test", "kl_forget", "kl_ratio",
           "agreement_test", "time_ratio", "time_s", "compile_s", "mia_auc", "memory_bytes", "forget_loss_ratio")
REPORTS = ("grid", "fidelity")
# a model entry's keys: a named recipe, build_problem's arguments, and TrainConfig fields replacing
# the recipe's (the seed is the grid's)
MODEL_KEYS = ({"recipe", "data", "model", "l2", "hidden", "penalize_bias", "trajectory"}
              | {f.name for f in dataclasses.fields(TrainConfig)} - {"seed"})
FORGET_SCORE_MIN_SEEDS = 8
TARGET_KEYS = {"method", "ratios", "kl_ratio", "rel_param_error", "time_ratio", "beat"}


# -- configuration --------------------------------------------------------------------------


@dataclasses.dataclass
class GridConfig:
    """One grid (see the module docstring); checked when built and again by :func:`run_grid`.

    Attributes:
      out: the output directory.
      seeds, ratios, methods: the grid's axes (ratios: fractions in (0, 1), ``"N%"``, ``"classK"``
        or ``"seqMxF"``; methods: registered non-reference names, optionally ``NAME:KEY=VALUE+...``).
      models: dicts with ``data`` and ``model`` (or a ``recipe`` name) and optionally ``l2``
        (default 1e-3), ``hidden``, ``penalize_bias``, ``trajectory`` (default ``"auto"``: as the
        CLI, non-convex mini-batch recipes keep a trajectory buffer, so ``mini`` is trajectory
        unlearning, and every test metric of that model leaves out the held-out test images it
        reads; false: the fixed-point ``mini`` on an MLP) and TrainConfig fields.
      mia: also run the loss-threshold membership attack on the removed examples.
      report: ``"grid"`` or ``"fidelity"`` (the reports' format).
      resume: skip cells already in ``results.jsonl`` (False: rerun them, replacing their rows).
      reference_rows: add a row for the reference (``retrain``) wherever it ran.
      targets: the fidelity report's acceptance check: ``method``, ``ratios``, upper bounds on
        ``kl_ratio``, ``rel_param_error``, ``time_ratio``, and ``beat``: methods (with or without
        options) whose ``kl_test`` the method must be below in the same cell.
      title, intro: the report's heading and the paragraph below it.
      forget_seed: draw the uniform forget sets from this seed for every model seed (default: the
        cell's seed), so that the models of different seeds forget the same examples.
      forget_score: also compute the forget score of the NeurIPS 2023 unlearning challenge
        (:func:`~mini_unlearn_jax.evaluation.attacks.forget_score`) per data, model, ratio and
        method over the seeds: the unlearned models' per-example LiRA statistic on the forget set
        against the retrained models' (needs >= 8 seeds, below which its confidence bounds cannot
        separate anything, and the same forget set for every seed: class ratios, or
        ``forget_seed``). Written to ``forget_score.json`` and the table.
    """

    out: str
    seeds: list
    ratios: list
    methods: list
    models: list
    mia: bool = True
    report: str = "grid"
    resume: bool = True
    reference_rows: bool = False
    targets: dict = dataclasses.field(default_factory=dict)
    title: str = ""
    intro: str = ""
    forget_seed: int | None = None
    forget_score: bool = False

    def __post_init__(self):
        self.validate()

    @classmethod
    def load(cls, path: str | Path) -> GridConfig:
        import tomllib

        with open(path, "rb") as f:
            raw = tomllib.load(f)
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        missing = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING} - set(raw)
        if missing:
            raise ValueError(f"{path}: missing keys {sorted(missing)}")
        try:
            return cls(**raw)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def validate(self) -> None:
        """Raise ValueError naming the first problem: an unknown method, a bad ratio or model entry."""
        for name in ("seeds", "ratios", "methods", "models"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"{name} must be a non-empty list, got {value!r}")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"seeds must be integers, got {self.seeds!r}")
        if self.report not in REPORTS:
            raise ValueError(f"unknown report {self.report!r}: choose one of {', '.join(REPORTS)}")
        for r in self.ratios:
            kind = parse_ratio(r)[0]
            if self.report == "fidelity" and kind != "uniform":
                raise ValueError(f"ratio {r!r}: the fidelity report shows uniform ratios only (fractions or N%)")
        for label in self.methods:
            name, _ = parse_method(label)
            if R.get_method(name).ground_truth:
                raise ValueError(f"method {name!r} is the reference every method is compared with; "
                                 "set reference_rows = true for rows of it")
        if len(set(map(str, self.methods))) != len(self.methods):
            raise ValueError(f"methods repeat a label: {self.methods}")
        self.models = [_model_entry(m) for m in self.models]
        pairs = set()
        for m in self.models:
            bad = set(m) - MODEL_KEYS
            if bad:
                raise ValueError(f"model entry {m['model']} on {m['data']}: unknown keys {sorted(bad)}; "
                                 f"use {', '.join(sorted(MODEL_KEYS))}")
            if (m["data"], m["model"]) in pairs:
                raise ValueError(f"two model entries for {m['model']} on {m['data']}")
            pairs.add((m["data"], m["model"]))
        bad = set(self.targets) - TARGET_KEYS
        if bad:
            raise ValueError(f"targets: unknown keys {sorted(bad)}; use {', '.join(sorted(TARGET_KEYS))}")
        if self.targets and "method" not in self.targets:
            raise ValueError("targets: name the method they are for (method = \"mini\")")
        for r in self.targets.get("ratios", []):
            parse_ratio(r)
        if self.forget_score:
            if len(set(self.seeds)) < FORGET_SCORE_MIN_SEEDS:
                raise ValueError(f"forget_score needs at least {FORGET_SCORE_MIN_SEEDS} seeds: with m models per side "
                                 "the 95 % Clopper-Pearson bounds cannot tell even fully separable outputs apart "
                                 "below m = 8 (every method would score 1)")
            shared = [r for r in self.ratios if parse_ratio(r)[0] == "class" or self.forget_seed is not None]
            if len(shared) != len(self.ratios) or any(parse_ratio(r)[0] == "seq" for r in self.ratios):
                raise ValueError("forget_score compares the seeds' models on the same forget set: use class ratios, "
                                 "or set forget_seed for uniform ones (sequential ratios are not supported)")

    def cells(self) -> list[dict]:
        return [{"data": m["data"], "model": m["model"], "seed": s, "ratio": str(r), "method": str(meth)}
                for m in self.models for s in self.seeds for r in self.ratios for meth in self.methods]


def _model_entry(m) -> dict:
    """A model entry with a named recipe (:data:`~mini_unlearn_jax.app.recipes.RECIPES`) expanded:
    its data, model, l2 and hidden, which the entry's own keys replace."""
    if not isinstance(m, dict):
        raise ValueError(f"a model entry is a table (data, model, ... or recipe), got {m!r}")
    entry = dict(m)
    if "recipe" in entry:
        if entry["recipe"] not in recipes.RECIPES:
            raise ValueError(f"unknown recipe {entry['recipe']!r}: choose one of {', '.join(recipes.RECIPES)}")
        spec, model, l2, hidden, _ = recipes.RECIPES[entry["recipe"]]
        if entry.get("model", model) != model:
            raise ValueError(f"recipe {entry['recipe']!r} trains a {model}, not a {entry['model']}")
        entry = {"data": spec, "model": model, "l2": l2} | ({"hidden": hidden} if hidden else {}) | entry
    if not isinstance(entry.get("data"), str) or not isinstance(entry.get("model"), str):
        raise ValueError(f"a model entry needs data and model strings (or a recipe), got {m!r}")
    return entry


def parse_ratio(r) -> tuple[str, float | int, int]:
    """``0.1`` or ``"10%"`` -> ("uniform", 0.1, 1); ``"class3"`` -> ("class", 3, 1); ``"seq5x0.1"`` -> ("seq", 0.1, 5)."""
    text = str(r).strip()
    try:
        if text.startswith("class"):
            return "class", int(text[5:]), 1
        if text.startswith("seq"):
            times, frac = text[3:].split("x")
            return "seq", float(frac), int(times)
        value = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"ratio {r!r}: write a fraction in (0, 1), N% (0 < N < 100), classK or seqMxF") from None
    if not 0 < value < 1:
        raise ValueError(f"ratio {r!r} must lie in (0, 1) (or (0%, 100%)), or be classK / seqMxF")
    return "uniform", value, 1


def ratio_pct(r) -> float:
    """The uniform ratio ``r`` in percent, exactly as written (``"10%"`` and ``0.1`` -> 10.0)."""
    text = str(r).strip()
    try:
        return float(text[:-1]) if text.endswith("%") else float(Decimal(text) * 100)
    except InvalidOperation:
        raise ValueError(f"ratio {r!r} is not a uniform fraction or percent") from None


def pct_ratio(pct: float) -> str:
    """A ratio label in percent: ``10.0`` -> ``"10%"`` (the shortest exact text)."""
    return np.format_float_positional(float(pct), trim="-") + "%"


def _option_value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_method(label: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME:KEY=VALUE[+KEY=VALUE...]`` -> (registered name, options for run_method)."""
    if not isinstance(label, str):
        raise ValueError(f"a method is a string NAME or NAME:KEY=VALUE[+KEY=VALUE...], got {label!r}")
    name, _, rest = label.partition(":")
    R.get_method(name)  # ValueError naming the registered methods
    options = {}
    for item in filter(None, rest.split("+")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"method {label!r}: bad option {item!r}; write KEY=VALUE")
        options[key] = _option_value(value)
    return name, options


# -- rows on disk ---------------------------------------------------------------------------


def _check_ours(path: Path) -> None:
    """Raise unless every complete line of ``path`` is a grid row (JSON with the cell's keys)."""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            key_of(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if i == len(lines) - 1:
                continue  # a last line cut by an interruption (load_rows skips it too)
            raise ValueError(f"{path} is not a row store of this harness (line {i + 1} is not a grid row); "
                             "it is left as it is: choose another output directory") from None


def key_of(row: dict) -> tuple:
    return (row["data"], row["model"], int(row["seed"]), str(row["ratio"]), row["method"])


def load_rows(out: str | Path) -> list[dict]:
    """The rows of ``out/results.jsonl``, the last one of each cell (a line cut by an interruption is dropped)."""
    path = Path(out) / "results.jsonl"
    if not path.exists():
        return []
    rows: dict = {}
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interruption: that cell reruns
                continue
            rows.pop(key_of(row), None)
            rows[key_of(row)] = row
    return list(rows.values())


def _previous_fidelity(out: Path) -> tuple[list, dict]:
    """Runs and models recorded by an earlier fidelity report in ``out`` (empty without one)."""
    path = out / "results.json"
    if not path.exists():
        return [], {}
    old = json.loads(path.read_text())
    if not isinstance(old, dict):
        return [], {}
    return list(old.get("runs", [])), dict(old.get("models", {}))


def _from_fidelity_row(row: dict, models: dict) -> dict:
    """A row of a fidelity ``results.json`` (written before ``results.jsonl`` existed) as a grid row."""
    r = dict(row)
    spec = models.get(f"{r['model']}:{r['n_train']}:{r['seed']}", {}).get("data_spec")
    r["data"], r["ratio"] = spec, pct_ratio(r.pop("ratio_pct"))
    if "agreement" in r:
        r["agreement_test"] = r.pop("agreement")
    return r


# -- training and evaluation ----------------------------------------------------------------


class _Model(NamedTuple):
    trained: recipes.Trained
    record: dict  # the recipe, its cost, accuracy and sizes (the fidelity report's "models")
    memory: int  # training history the fixed-point mini variants read: snapshot buffer + curvature stats
    trajectory_memory: int = 0  # the trajectory buffer trajectory unlearning reads (0 without one)


def _train(spec: dict, seed: int, log) -> _Model:
    overrides = {k: v for k, v in spec.items()
                 if k not in ("recipe", "data", "model", "l2", "hidden", "penalize_bias", "trajectory")}
    l2 = float(spec.get("l2", 1e-3))
    make_config = recipes.RECIPES[spec["recipe"]][4] if "recipe" in spec else None
    log(f"grid: training {spec['model']} on {spec['data']} (l2={l2}, seed {seed}"
        + (f", recipe {spec['recipe']}" if "recipe" in spec else "") + (f", {overrides}" if overrides else "") + ")")
    tr = recipes.build_problem(spec["data"], spec["model"], l2, seed, hidden=int(spec.get("hidden", 256)),
                               penalize_bias=bool(spec.get("penalize_bias", False)),
                               config=make_config(seed) if make_config is not None else None,
                               trajectory=spec.get("trajectory", "auto"), **overrides)
    held_out = 0
    if tr.val_indices is not None:
        # trajectory unlearning reads these test images (rewind rule, calibration): every test
        # metric of this model, for every method and the reference, is on the rest of the test set
        held_out = int(np.size(tr.val_indices))
        ds = tr.dataset
        unread = recipes.unread_test_indices(len(ds.y_test), tr.val_indices)
        tr = tr._replace(dataset=dataclasses.replace(ds, x_test=ds.x_test[unread], y_test=ds.y_test[unread]))
    pb, ds = tr.problem, tr.dataset
    p_train = mt.predict_probs(pb.objective, pb.params, ds.x_train)
    p_test = mt.predict_probs(pb.objective, pb.params, ds.x_test)
    snap_bytes, stats_bytes = nbytes(pb.snapshots), (nbytes(pb.stats) if pb.stats is not None else 0)
    traj_bytes = nbytes(pb.extras["trajectory"].state) if "trajectory" in pb.extras else 0
    record = {
        "model": spec["model"], "data_spec": spec["data"], "n_train": ds.n_train, "n_test": int(ds.x_test.shape[0]),
        "n_test_held_out": held_out,
        "l2": l2, "hidden": getattr(tr.model, "hidden", None), "seed": seed,
        "train_config": dataclasses.asdict(pb.train_config),
        "train_s": tr.train_s, "train_compile_s": tr.train_compile_s, "stats_s": tr.stats_s,
        "steps_run": int(tr.state.step), "final_grad_norm": float(tr.state.grad_norm),
        "train_acc": mt.accuracy(p_train, ds.y_train), "test_acc": mt.accuracy(p_test, ds.y_test),
        "param_count": int(sum(np.size(a) for a in jax.tree.leaves(pb.params))),
        "param_bytes": nbytes(pb.params), "snapshot_bytes": snap_bytes, "stats_bytes": stats_bytes,
        "trajectory_bytes": traj_bytes,
        "mini_configs": {k: dataclasses.asdict(v) for k, v in M.MINI_VARIANTS.items()},
    }
    log(f"grid: trained in {tr.train_s:.1f}s (+{tr.train_compile_s:.1f}s compile, {record['steps_run']} steps, "
        f"grad norm {record['final_grad_norm']:.2e}), train acc {record['train_acc']:.4f}, "
        f"test acc {record['test_acc']:.4f}; stats {tr.stats_s:.1f}s")
    return _Model(tr, record, snap_bytes + stats_bytes, traj_bytes)


def _requests(kind: str, value, times: int, n: int, y, seed: int) -> list[np.ndarray]:
    """The sorted training indices each request of a cell removes (one request unless ``seqMxF``)."""
    if kind == "class":
        return [np.flatnonzero(np.asarray(y) == value).astype(np.int32)]
    r = int(round(value * n))
    if not 1 <= r * times < n:
        raise ValueError(f"ratio {value:g}{f' x {times}' if times > 1 else ''} of {n} training examples removes "
                         f"{r * times}: give a ratio that removes 1 to {n - 1}")
    rng = np.random.default_rng(seed)
    if kind == "seq":
        order = rng.permutation(n)
        return [np.sort(order[k * r:(k + 1) * r]).astype(np.int32) for k in range(times)]
    return [np.sort(rng.choice(n, size=r, replace=False)).astype(np.int32)]


class _Reference:
    """A cell's reference: the ground-truth output and the original model it is compared with."""

    def __init__(self, name: str, out: M.MethodOutput, original):
        self.name, self.out, self.params, self.original, self.time_s = name, out, out.params, original, out.time_s


def _own_reference(name: str, options: dict, res: M.MethodOutput, pb, forget) -> _Reference | None:
    """The method's own ground truth, for a method that trains its own original model (the
    registry's `own_reference`; e.g. DeltaGrad's (S)GD recipe), with that original
    (`info['own_original']`); None for the others."""
    own = R.get_method(name).own_reference
    if own is None:
        return None
    return _Reference(own.__name__, own(pb, forget, **options), res.info["own_original"])


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if k == "own_original":
            continue
        if isinstance(v, dict):
            out[k] = _jsonable(v)
        elif isinstance(v, np.generic):
            out[k] = v.item()
        elif isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
        else:
            out[k] = str(v)
    return out


def _evaluate(mdl: _Model, res: M.MethodOutput, ref: _Reference, forget, memory_bytes: int, mia: bool) -> dict:
    pb, ds = mdl.trained.problem, mdl.trained.dataset
    row = {"n_removed": int(np.size(forget)), "reference": ref.name,
           "n_test": int(len(ds.y_test)), "n_test_held_out": mdl.record["n_test_held_out"]}
    row |= compare(pb.objective, res.params, ref.params, ref.original, pb.x, pb.y, forget, ds.x_test, ds.y_test,
                   attack=mia)
    if mia:  # the grid's committed results name the attack's AUC so
        row["mia_auc"], row["mia_auc_retrain"] = row.pop("auc"), row.pop("retrain_auc")
    return row | {
        "time_s": float(res.time_s), "compile_s": float(res.compile_s), "retrain_time_s": ref.time_s,
        "time_ratio": float(res.time_s) / max(ref.time_s, 1e-12),
        "memory_bytes": int(memory_bytes), "param_bytes": mdl.record["param_bytes"],
        "converged": bool(res.converged), "reason": res.reason, "info": _jsonable(dict(res.info)),
    }


def _phi_path(out: Path, cell: dict) -> Path:
    key = json.dumps([cell["data"], cell["model"], int(cell["seed"]), str(cell["ratio"]), cell["method"]])
    return out / "forget_phi" / (hashlib.sha1(key.encode()).hexdigest()[:20] + ".npz")


def _save_phi(out: Path, cell: dict, mdl: _Model, unlearned, reference, forget) -> None:
    """The per-example LiRA statistic (logit-scaled confidence) of the unlearned and the reference
    model on the forget set, for the forget score over seeds."""
    pb = mdl.trained.problem
    xf, yf = pb.x[forget], pb.y[forget]
    phi = lambda w: np.asarray(A.logit_confidence(pb.objective.apply_fn(w, xf), yf), np.float64)
    path = _phi_path(out, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, unlearned=phi(unlearned), reference=phi(reference), forget=np.asarray(forget, np.int64))


def _forget_scores(cfg: GridConfig, out: Path, rows: list[dict]) -> list[dict]:
    """The forget score of every (data, model, ratio, method) over the seeds whose statistics exist."""
    groups: dict = {}
    for r in rows:
        if r["method"] == r.get("reference") or "kl_ratio" not in r:
            continue
        path = _phi_path(out, r)
        if path.exists():
            groups.setdefault((r["data"], r["model"], str(r["ratio"]), r["method"]), []).append(path)
    scores = []
    for (data, model, ratio, method), paths in sorted(groups.items()):
        loaded = [np.load(p) for p in paths]
        same = all(np.array_equal(d["forget"], loaded[0]["forget"]) for d in loaded)
        entry = {"data": data, "model": model, "ratio": ratio, "method": method, "seeds": len(loaded)}
        if len(loaded) >= FORGET_SCORE_MIN_SEEDS and same:
            u = np.stack([d["unlearned"] for d in loaded])
            r_ = np.stack([d["reference"] for d in loaded])
            entry["forget_score"] = A.forget_score(u, r_)
        else:
            entry["forget_score"] = None
            entry["why_none"] = (f"fewer than {FORGET_SCORE_MIN_SEEDS} seeds" if len(loaded) < FORGET_SCORE_MIN_SEEDS
                                 else "the seeds' forget sets differ")
        scores.append(entry)
    return scores


class _Cells:
    """Runs the cells of one trained model, keeping its references (one retrain per ratio)."""

    def __init__(self, mdl: _Model, cfg: GridConfig, emit, log):
        self.mdl, self.cfg, self.emit, self.log = mdl, cfg, emit, log
        self.refs: dict = {}

    def reference(self, cell: dict, forget) -> _Reference:
        if cell["ratio"] not in self.refs:
            pb = self.mdl.trained.problem
            self.log(f"grid: {cell['model']} {cell['ratio']}: removing {np.size(forget)} of {pb.x.shape[0]}; "
                     "retraining (reference) ...")
            truth = R.ground_truth_method()
            ref = _Reference(truth, R.run_method(truth, pb, forget), pb.params)
            self.refs = {cell["ratio"]: ref}  # the cells of one ratio are consecutive
            if self.cfg.reference_rows:
                row = dict(cell, method=truth, n_train=self.mdl.trained.dataset.n_train)
                self.emit(row | _evaluate(self.mdl, ref.out, ref, forget, 0, self.cfg.mia))
        return self.refs[cell["ratio"]]

    def run(self, cell: dict) -> dict:
        pb, ds = self.mdl.trained.problem, self.mdl.trained.dataset
        name, options = parse_method(cell["method"])
        kind, value, times = parse_ratio(cell["ratio"])
        row = dict(cell, options=json.dumps(options) if options else "", n_train=ds.n_train)
        draw_seed = cell["seed"] if self.cfg.forget_seed is None else self.cfg.forget_seed
        requests = _requests(kind, value, times, ds.n_train, ds.y_train, draw_seed)
        forget = np.sort(np.concatenate(requests))
        why = R.applicable(name, pb)
        if why:
            return row | {"n_removed": int(forget.size), "converged": False, "reason": f"not applicable: {why}"}
        try:
            res = (self._sequential(name, options, requests) if kind == "seq"
                   else R.run_method(name, pb, forget, **options))
        except Exception as e:  # reported in the row; the other cells go on
            self.log(f"grid: {cell['model']} {cell['ratio']} {cell['method']} FAILED: {type(e).__name__}: {e}")
            return row | {"n_removed": int(forget.size), "converged": False, "reason": f"error: {type(e).__name__}: {e}"}
        own = _own_reference(name, options, res, pb, forget) if kind != "seq" else None
        ref = own or self.reference(cell, forget)
        if res.info.get("solver") == "trajectory":
            memory = self.mdl.trajectory_memory
        else:
            memory = res.info.get("cache_bytes", self.mdl.memory if res.info.get("solver") == "fixed-point" else 0)
        row |= _evaluate(self.mdl, res, ref, forget, memory, self.cfg.mia)
        if self.cfg.forget_score:
            _save_phi(Path(self.cfg.out), cell, self.mdl, res.params, ref.params, forget)
        return row

    def _sequential(self, name: str, options: dict, requests: list[np.ndarray]) -> M.MethodOutput:
        """Successive requests, each on the previous result; the result is compared with retraining
        on the cumulative remainder. ``time_s`` sums the requests (the refreshes between them excluded)."""
        pb = self.mdl.trained.problem
        alive, cur = np.arange(int(pb.x.shape[0])), pb
        total, compile_s, ok, reason = 0.0, 0.0, True, "converged"
        for chunk in requests:
            local = np.searchsorted(alive, chunk).astype(np.int32)
            res = R.run_method(name, cur, local, **options)
            total, compile_s = total + res.time_s, compile_s + res.compile_s
            if not res.converged:
                ok, reason = False, res.reason
            cur = M.after_removal(cur, res.params, local, res.buffers)
            alive = np.setdiff1d(alive, chunk)
        return M.MethodOutput(cur.params, ok, reason, total, compile_s, {"requests": len(requests)})


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
        _check_ours(sink_path)  # --fresh deletes only a row store this harness wrote
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

    if sink_path.exists() and sink_path.stat().st_size and not sink_path.read_bytes().endswith(b"\n"):
        with open(sink_path, "a") as f:  # an interrupted write left half a line: close it off
            f.write("\n")
    with open(sink_path, "a") as sink:

        def emit(row: dict) -> None:
            sink.write(json.dumps(row, default=float) + "\n")
            sink.flush()
            rows.pop(key_of(row), None)
            rows[key_of(row)] = row
            run["wall_s"] = time.perf_counter() - t0
            if incremental:
                write_reports(cfg, list(rows.values()), command=command, runs=runs, models=models)

        current: dict = {}
        skipped: set = set()
        finished = 0
        for cell in todo:
            spec = next(m for m in cfg.models if m["data"] == cell["data"] and m["model"] == cell["model"])
            tkey = (cell["data"], cell["model"], cell["seed"])
            if cell["data"] in skipped:
                continue
            if cfg.resume and key_of(cell) in {key_of(r) for r in load_rows(out)}:
                continue  # another worker on the same output directory did it
            if tkey not in current:
                if current:  # the previous model's compiled programs go with it
                    current.clear()
                    aot.clear_compiled()
                try:
                    mdl = _train(spec, cell["seed"], log)
                except DataError as e:
                    log(f"grid: skipping {cell['data']}: {e}")
                    skipped.add(cell["data"])
                    continue
                current = {tkey: _Cells(mdl, cfg, emit, log)}  # one trained model in memory at a time
                rec = mdl.record
                models[f"{rec['model']}:{rec['n_train']}:{rec['seed']}"] = rec
            row = current[tkey].run(cell)
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


# -- reports --------------------------------------------------------------------------------


def write_reports(cfg: GridConfig, rows: list[dict], *, command: str = "", runs=(), models=None) -> None:
    """Write ``cfg.out``'s reports in the format ``cfg.report`` (see the module docstring)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.report == "fidelity":
        _fidelity_reports(cfg, out, rows, list(runs), dict(models or {}))
    else:
        _grid_reports(cfg, out, rows, command)


def _ratio_sort(r: str):
    kind, value, times = parse_ratio(r)
    return ({"uniform": 0, "class": 1, "seq": 2}[kind], value, times)


def summarize(rows: list[dict]) -> dict:
    """``{(data, model, ratio, method): {metric: (mean, std, count)}}`` over seeds."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["data"], r["model"], str(r["ratio"]), r["method"]), []).append(r)
    out = {}
    for k, rs in groups.items():
        stats = {}
        for m in METRICS:
            vals = np.array([float(r[m]) for r in rs if m in r and r[m] is not None], float)
            if vals.size:
                stats[m] = (float(vals.mean()), float(vals.std()), int(vals.size))
        stats["converged"] = (float(np.mean([r["converged"] for r in rs])), 0.0, len(rs))
        out[k] = stats
    return out


def _mean_of(rows: list[dict], key: str) -> float:
    vals = [float(r[key]) for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else float("nan")


def _grid_reports(cfg: GridConfig, out: Path, rows: list[dict], command: str) -> None:
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=float))
    cols = sorted({k for r in rows for k in r} - {"info"})
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    methods_rows = [r for r in rows if r["method"] != r.get("reference")]  # the reference has its own line
    summ = summarize(methods_rows)
    lines = [f"# {cfg.title or 'Unlearning grid: mean ± std over seeds'}", ""]
    lines += [cfg.intro, ""] if cfg.intro else []
    lines += [f"Command: `{command}`", ""]
    shown = [("test_acc", "test acc", "{:.4f}"), ("kl_ratio", "KL ratio", "{:.3g}"),
             ("rel_param_error", "rel. param error", "{:.3f}"), ("time_ratio", "time / retrain", "{:.3g}"),
             ("mia_auc", "MIA AUC (loss)", "{:.3f}"),
             ("forget_loss_ratio", "forget-set loss / retrain's (1: as unseen as after retraining)", "{:.3f}")]
    for data, model in sorted({(k[0], k[1]) for k in summ}):
        ratios = sorted({k[2] for k in summ if k[:2] == (data, model)}, key=_ratio_sort)
        methods = sorted({k[3] for k in summ if k[:2] == (data, model)})
        lines += [f"## {model} on {data}", ""]
        held = {(r.get("n_test"), r.get("n_test_held_out")) for r in rows
                if (r["data"], r["model"]) == (data, model) and r.get("n_test_held_out")}
        if held:
            n_test, n_held = max(held)
            lines += [f"Test metrics are on {n_test} test images: the other {n_held} are the held-out split "
                      "trajectory unlearning reads.", ""]
        of = {rt: [r for r in rows if (r["data"], r["model"], str(r["ratio"])) == (data, model, rt)] for rt in ratios}
        # the retrain line: rows measured against the shared retrain only (DeltaGrad's rows carry its
        # own SGD retrain's figures; rows written before the reference was recorded are left out)
        shared = {rt: [r for r in of[rt] if r.get("reference") == R.ground_truth_method()] for rt in ratios}
        reference_line = {"test_acc": ("retrain_test_acc", "{:.4f}"), "mia_auc": ("mia_auc_retrain", "{:.3f}")}
        for metric, title, fmtx in shown:
            lines += [f"**{title}**", "", "| method | " + " | ".join(ratios) + " |", "|---|" + "---:|" * len(ratios)]
            if metric in reference_line:
                key, f = reference_line[metric]
                lines.append("| retrain | " + " | ".join(f.format(_mean_of(shared[rt], key)) for rt in ratios) + " |")
            for meth in methods:
                cellsx = []
                for rt in ratios:
                    s = summ.get((data, model, rt, meth), {}).get(metric)
                    cellsx.append("—" if s is None else (fmtx.format(s[0]) + (f" ± {fmtx.format(s[1])}" if s[2] > 1 else "")))
                lines.append(f"| {meth} | " + " | ".join(cellsx) + " |")
            lines.append("")
    if cfg.forget_score:
        scores = _forget_scores(cfg, out, rows)
        (out / "forget_score.json").write_text(json.dumps(scores, indent=1, default=float))
        lines += ["## Forget score (NeurIPS 2023 unlearning challenge metric)", "",
                  "Per forget example, the best threshold or interval attack on the seeds' LiRA statistics separates "
                  "unlearned from retrained models with an epsilon (Clopper-Pearson bounds at 95 %); the score averages "
                  "2^-bucket(epsilon) over examples: 1 = indistinguishable, 0 = separable. With m seeds per side it "
                  "resolves epsilons up to ceil(log(m - 1)): 8 seeds give a coarse score, the challenge used 512 "
                  "models.", "",
                  "| data | model | ratio | method | seeds | forget score |", "|---|---|---|---|---:|---:|"]
        for e in scores:
            v = "—" if e["forget_score"] is None else f"{e['forget_score']:.3f}"
            lines.append(f"| {e['data']} | {e['model']} | {e['ratio']} | {e['method']} | {e['seeds']} | {v} |")
        lines.append("")
    (out / "table.md").write_text("\n".join(lines))
    _grid_plots(rows, summ, out)


def _grid_plots(rows, summ, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = sorted({(k[0], k[1]) for k in summ})
    if not pairs:
        return
    for metric, ylabel, fname, logy in (("test_acc", "test accuracy", "test_acc_vs_ratio.png", False),
                                        ("mia_auc", "MIA AUC (loss attack)", "mia_auc_vs_ratio.png", False),
                                        ("time_ratio", "time / retrain time", "time_ratio_vs_ratio.png", True)):
        fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4), squeeze=False)
        for ax, (data, model) in zip(axes[0], pairs, strict=True):
            for meth in sorted({k[3] for k in summ if k[:2] == (data, model)}):
                pts = sorted([(parse_ratio(k[2])[1], v[metric][0], v[metric][1]) for k, v in summ.items()
                              if k[:2] == (data, model) and k[3] == meth and parse_ratio(k[2])[0] == "uniform"
                              and metric in v])
                if pts:
                    xs, ys, es = zip(*pts, strict=True)
                    ax.errorbar(xs, ys, yerr=es, marker="o", label=meth, capsize=2)
            if metric in ("test_acc", "mia_auc"):
                key = "retrain_test_acc" if metric == "test_acc" else "mia_auc_retrain"
                pts = sorted({(parse_ratio(r["ratio"])[1], float(r.get(key, np.nan))) for r in rows
                              if (r["data"], r["model"]) == (data, model) and parse_ratio(r["ratio"])[0] == "uniform"
                              and r.get(key) is not None})
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, "k--", label=R.ground_truth_method())
            ax.set_xscale("log")
            if logy:
                ax.set_yscale("log")
            ax.set_xlabel("removal ratio")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{model} on {data}")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4), squeeze=False)
    for ax, (data, model) in zip(axes[0], pairs, strict=True):
        plotted = False
        for meth in sorted({k[3] for k in summ if k[:2] == (data, model)}):
            pts = [(v["time_ratio"][0], v["kl_ratio"][0]) for k, v in summ.items()
                   if k[:2] == (data, model) and k[3] == meth and "kl_ratio" in v and v["kl_ratio"][0] > 0
                   and v["time_ratio"][0] > 0]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.scatter(xs, ys, label=meth, s=18)
                plotted = True
        if plotted:  # log axes need positive values; an empty panel says why it is empty
            ax.set_xscale("log")
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no positive KL and time ratios to plot", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_xlabel("time / retrain time")
        ax.set_ylabel("KL(p_R || p_U) / KL(p_R || p_original)")
        ax.set_title(f"fidelity vs time: {model} on {data}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fidelity_vs_time.png", dpi=110)
    plt.close(fig)


# -- the fidelity report --------------------------------------------------------------------

FIDELITY_COLUMNS = ["model", "method", "options", "ratio_pct", "seed", "n_train", "n_removed", "reference",
                    "test_acc", "forget_acc", "retain_acc", "rel_param_error", "kl_test", "kl_forget",
                    "original_kl_test", "kl_ratio", "agreement", "time_s", "compile_s", "retrain_time_s",
                    "time_ratio", "memory_bytes", "param_bytes", "converged", "reason", "retrain_test_acc",
                    "original_test_acc", "forget_loss", "retrain_forget_loss", "forget_loss_ratio", "n_test",
                    "n_test_held_out", "retrain_retain_acc", "retrain_forget_acc", "original_retain_acc",
                    "original_forget_acc", "param_error"]


def _fidelity_row(row: dict) -> dict:
    """A grid row in the fidelity report's columns (ratio in percent, ``agreement``)."""
    src = dict(row, ratio_pct=ratio_pct(row["ratio"]))
    if "agreement_test" in src:
        src["agreement"] = src["agreement_test"]
    return {k: src[k] for k in [c for c in FIDELITY_COLUMNS if c != "options"] + ["info", "options"] if k in src}


def _fidelity_run(run: dict) -> dict:
    """A run record as the fidelity report has always stored it: ratios in percent, one ``seed``."""
    out = {}
    for k, v in run.items():
        if k == "seeds" and len(v) == 1:
            out["seed"] = v[0]
        else:
            out[k] = [ratio_pct(x) if isinstance(x, str) else x for x in v] if k == "ratios" else v
    return out


def _base(label: str) -> str:
    return label.partition(":")[0]


def _method_rank(label: str) -> tuple:
    """References first, then registration order (variants such as ``deltagrad:lr=0.1`` after their base)."""
    names = list(R.METHODS)
    order = [n for n in names if R.get_method(n).ground_truth] + [n for n in names if not R.get_method(n).ground_truth]
    base = _base(label)
    return (order.index(base) if base in order else len(order), label)


def _method_labels(rows: list) -> list:
    return sorted({r["method"] for r in rows}, key=_method_rank)


def _fmt(v, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if kind == "acc":
        return f"{v:.4f}"
    if kind == "sci":
        return f"{v:.2e}"
    if kind == "rel":
        return f"{v:.3f}"
    if kind == "time":
        return f"{v:.3f}" if v < 100 else f"{v:.1f}"
    if kind == "bytes":
        if v == 0:
            return "0"
        for unit, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if v >= s:
                return f"{v / s:.2f} {unit}"
        return f"{v} B"
    return str(v)


def _pct(r) -> str:
    return f"{float(r):g}%"


def _pivot(rows: list, key: str, kind: str, title: str) -> list[str]:
    ratios = sorted({float(r["ratio_pct"]) for r in rows})
    cell = {(r["method"], float(r["ratio_pct"])): r for r in rows}
    lines = [f"**{title}**", "", "| method | " + " | ".join(_pct(x) for x in ratios) + " |",
             "|---|" + "---:|" * len(ratios)]
    for m in _method_labels(rows):
        vals = []
        for x in ratios:
            r = cell.get((m, x))
            if r is None:
                vals.append("")
                continue
            s = _fmt(r.get(key), kind)
            if not r.get("converged", True):
                s += " ✗"
            vals.append(s)
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return lines + [""]


def _target_text(ratios) -> list[str]:
    """Ratios in percent without the sign (runs before the harness recorded percents as numbers)."""
    return [f"{ratio_pct(r) if isinstance(r, str) else r:g}" for r in ratios]


def _check_targets(rows: list, targets: dict) -> list[str]:
    if not targets:
        return []
    cell = {(r["method"], float(r["ratio_pct"])): r for r in rows}
    bounds = [(k, targets[k], label) for k, label in (("kl_ratio", "kl ratio"), ("rel_param_error", "rel err"),
                                                      ("time_ratio", "time ratio")) if k in targets]
    out = []
    for ratio in targets.get("ratios", []):
        pct = ratio_pct(ratio)
        r = cell.get((targets["method"], pct))
        if r is None or "kl_ratio" not in r:
            continue
        checks = [f"{label} {r[k]:.3g} {'≤' if r[k] <= bound else '>'} {bound}" for k, bound, label in bounds]
        ok = all(r[k] <= bound for k, bound, _ in bounds) and r["converged"]
        for d in rows:
            if _base(d["method"]) not in targets.get("beat", ()) or float(d["ratio_pct"]) != pct:
                continue
            better = r["kl_test"] < d["kl_test"]
            ok = ok and better
            checks.append(f"kl_test {r['kl_test']:.3g} {'<' if better else '≥'} {d['method']}'s {d['kl_test']:.3g}")
        out.append(f"- {_pct(pct)}: **{'PASS' if ok else 'FAIL'}** — " + "; ".join(checks)
                   + ("" if r["converged"] else f"; not converged ({r['reason']})"))
    return out


def _sort_fidelity(rows: list) -> list:
    return sorted(rows, key=lambda r: (r["model"], r["n_train"], r["seed"], float(r["ratio_pct"]),
                                       _method_rank(r["method"])))


def _fidelity_table(cfg: GridConfig, path: Path, rows: list, runs: list, models: dict) -> None:
    tg, truth = cfg.targets, R.ground_truth_method()
    lines = [f"# {cfg.title or 'Unlearning methods against retraining'}", ""] + ([cfg.intro, ""] if cfg.intro else [])
    by_model: dict = {}
    for r in rows:
        by_model.setdefault((r["model"], r["n_train"], r["seed"]), []).append(r)
    for (model, n_train, seed), mrows in by_model.items():
        mc = models.get(f"{model}:{n_train}:{seed}", {})
        tc = mc.get("train_config", {})
        lines += [f"## {model} — {mc.get('data_spec', '?')} (n_train={n_train}, seed={seed})", ""]
        if mc:
            lines += [f"l2={mc['l2']}" + (f", hidden={mc['hidden']}" if mc.get("hidden") else "")
                      + f", {tc.get('optimizer')} "
                      + ("full batch" if tc.get("batch_size") is None else f"batch {tc.get('batch_size')}")
                      + f", {mc['steps_run']} steps (final grad norm {mc['final_grad_norm']:.2e}); "
                      f"trained in {mc['train_s']:.1f}s; original train acc {mc['train_acc']:.4f}, "
                      f"test acc {mc['test_acc']:.4f}; {mc['param_count']} parameters "
                      f"({_fmt(mc['param_bytes'], 'bytes')}); snapshot buffer {_fmt(mc['snapshot_bytes'], 'bytes')}"
                      f" (K={tc.get('snapshots')}), curvature stats {_fmt(mc['stats_bytes'], 'bytes')}"
                      + (f", trajectory buffer {_fmt(mc['trajectory_bytes'], 'bytes')}" if mc.get("trajectory_bytes")
                         else "") + "."
                      + (f" Test metrics are on {mc['n_test']} test images: the other {mc['n_test_held_out']} are "
                         "the held-out split trajectory unlearning reads." if mc.get("n_test_held_out") else ""), ""]
        ok_rows = [r for r in mrows if "kl_ratio" in r]
        lines += _pivot(ok_rows, "kl_ratio", "sci",
                        "KL ratio: KL(p_R‖p_U) / KL(p_R‖p_original) on test (lower is better; 1 = did nothing)")
        lines += _pivot(ok_rows, "rel_param_error", "rel", "Relative parameter error ‖w_U−w_R‖ / ‖w*−w_R‖")
        lines += _pivot(ok_rows, "time_ratio", "sci", "Time ratio: time_s / retrain time_s of the same cell")
        lines += _pivot(ok_rows, "test_acc", "acc", "Test accuracy")
        lines += _pivot(ok_rows, "forget_acc", "acc", "Forget-set accuracy")
        lossy = [r for r in ok_rows if "forget_loss_ratio" in r]
        if lossy:  # rows written before the harness recorded it have none
            lines += _pivot(lossy, "forget_loss_ratio", "rel",
                            "Forget-set loss / the retrained model's (1 = as unseen as after retraining; near 0 = still memorised)")
        lines += _pivot(ok_rows, "agreement", "acc", "Test prediction agreement with the retrained model")
        lines += ["**All cells**", "",
                  "| ratio | method | test acc | forget acc | rel err | kl_test | kl ratio | agree | time s | "
                  "compile s | time ratio | memory | converged |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in mrows:
            if "kl_ratio" not in r:
                lines.append(f"| {_pct(r['ratio_pct'])} | {r['method']} | | | | | | | | | | | ✗ {r['reason']} |")
                continue
            conv = "yes" if r["converged"] else f"✗ {r['reason']}"
            lines.append(
                f"| {_pct(r['ratio_pct'])} | {r['method']} | {_fmt(r['test_acc'], 'acc')} | {_fmt(r['forget_acc'], 'acc')} | "
                f"{_fmt(r['rel_param_error'], 'rel')} | {_fmt(r['kl_test'], 'sci')} | {_fmt(r['kl_ratio'], 'sci')} | "
                f"{_fmt(r['agreement'], 'acc')} | {_fmt(r['time_s'], 'time')} | {_fmt(r['compile_s'], 'time')} | "
                f"{_fmt(r['time_ratio'], 'sci')} | {_fmt(r['memory_bytes'], 'bytes')} | {conv} |")
        lines.append("")
        for label in _method_labels([r for r in ok_rows if r.get("reference") not in (None, r["method"], truth)]):
            own = [r for r in ok_rows if r["method"] == label]
            lines += [f"`{label}` trains its own original model ({json.dumps(own[0]['info'].get('config', {}))}), so its "
                      f"reference is `{own[0]['reference']}` (its own recipe on the remaining data), its original "
                      "model is that recipe on all data, and its time ratio is against that reference's time. Its "
                      "own original/retrained test accuracy: "
                      + ", ".join(f"{_pct(r['ratio_pct'])}: {r['original_test_acc']:.4f}/{r['retrain_test_acc']:.4f}"
                                  for r in own) + ".", ""]
        checked = _check_targets(ok_rows, tg)
        if checked:
            bounds = ", ".join(f"{label} ≤ {tg[k]}" for k, label in (("kl_ratio", "kl ratio"), ("rel_param_error", "rel err"),
                                                                     ("time_ratio", "time ratio")) if k in tg)
            beat = "".join(f", kl_test below {b}'s" for b in tg.get("beat", ()))
            lines += [f"**Targets for `{tg['method']}` at {'/'.join(_target_text(tg.get('ratios', [])))}%** "
                      f"({bounds}{beat}):", ""] + checked + [""]
        bad = [r for r in mrows if not r.get("converged", True)]
        if bad:
            lines += ["**Not converged / failed:** " + "; ".join(
                f"{r['method']} at {_pct(r['ratio_pct'])} ({r['reason']})" for r in bad), ""]
    lines += ["## Notes", "",
              "- Memory: snapshot buffer + curvature statistics for the mini variants (`nbytes(problem.snapshots)` "
              "+ `nbytes(stats)`), the per-step training cache for DeltaGrad (`info['cache_bytes']`), 0 for the "
              "others (they keep no training history; they need the parameters and the data).",
              "- Times exclude compilation (`compile_s`, compiled ahead of time); `retrain` is the training recipe "
              "on the remaining data. ✗ marks a method that reported non-convergence.",
              "- Forget set of ratio ρ: `sort(np.random.default_rng(seed).choice(n, round(ρ n), replace=False))`, "
              "as `mini-unlearn unlearn --ratio ρ --seed seed`.", "",
              "## Runs", ""]
    for run in runs:
        mi = run["machine"]
        lib = run.get("library", {})
        libtxt = (f"library {lib.get('git_commit', '?')}{' + uncommitted changes' if lib.get('library_dirty') else ''}"
                  f" (sources sha256 {lib.get('library_sha256', '?')}"
                  + (", changed during the run" if "library_at_end" in run else "") + ")")
        lines += [f"- `{run['command']}` — started {run['started']}, wall {run.get('wall_s', float('nan')):.0f}s, {libtxt}"
                  f"{'' if run.get('finished') else ' (unfinished)'}; models {','.join(run['models'])}, ratios "
                  f"{','.join(_target_text(run['ratios']))}; machine: nproc={mi['nproc']}, {mi['cpu']}, "
                  f"{mi['memory']}, jax {mi['jax']} (jaxlib {mi['jaxlib']}), device {mi['device']}, "
                  f"{mi['platform']}, Python {mi['python']}"]
    path.write_text("\n".join(lines) + "\n")


def _fidelity_plot(cfg: GridConfig, path: Path, rows: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in rows if "kl_ratio" in r and r["method"] != r.get("reference")]
    models = list(dict.fromkeys((r["model"], r["n_train"]) for r in rows))
    if not models:
        return
    labels = _method_labels(rows)
    markers = dict(zip(labels, itertools.cycle(["o", "v", "^", "s", "D", "X", "P", "*", "h", "p", "<", ">", "d"])))
    ratios = sorted({float(r["ratio_pct"]) for r in rows})
    cmap = plt.get_cmap("viridis")
    color = {x: cmap(i / max(1, len(ratios) - 1)) for i, x in enumerate(ratios)}
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5.2), squeeze=False)
    floor = 1e-8
    for ax, (model, n_train) in zip(axes[0], models, strict=True):
        for r in rows:
            if (r["model"], r["n_train"]) != (model, n_train):
                continue
            x = max(r["time_ratio"], floor)
            y = max(r["kl_ratio"], floor) if np.isfinite(r["kl_ratio"]) else np.nan
            ax.scatter(x, y, marker=markers[r["method"]], color=color[float(r["ratio_pct"])], s=60,
                       edgecolors="k" if r["converged"] else "r", linewidths=0.6 if r["converged"] else 1.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        if "kl_ratio" in cfg.targets:
            ax.axhline(cfg.targets["kl_ratio"], color="tab:red", lw=0.6, ls=":")
        if "time_ratio" in cfg.targets:
            ax.axvline(cfg.targets["time_ratio"], color="tab:red", lw=0.6, ls=":")
        ax.set_xlabel("time_s / retrain time_s (same cell)")
        ax.set_ylabel("test KL(p_R‖p_U) / KL(p_R‖p_original)")
        ax.set_title(f"{model} (Fashion-MNIST, n={n_train})")
        ax.grid(True, which="both", alpha=0.25)
    handles = [Line2D([], [], marker=markers[m], ls="", color="grey", markeredgecolor="k", label=m) for m in labels]
    handles += [Line2D([], [], marker="o", ls="", color=color[x], label=f"{x:g}%") for x in ratios]
    handles += [Line2D([], [], marker="o", ls="", color="w", markeredgecolor="r", markeredgewidth=1.8,
                       label="not converged")]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle("Fidelity vs cost (DeltaGrad against its own (S)GD retrain)"
                 + (f"; red dotted: {cfg.targets['method']} targets" if cfg.targets else ""))
    fig.tight_layout(rect=(0, 0, 0.88, 0.95))
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, path)


def _fidelity_reports(cfg: GridConfig, out: Path, rows: list, runs: list, models: dict) -> None:
    frows = _sort_fidelity([_fidelity_row(r) for r in rows])
    runs = [_fidelity_run(r) for r in runs]
    tmp = out / "results.json.partial"
    tmp.write_text(json.dumps({"runs": runs, "models": models, "rows": frows}, indent=1, default=float))
    os.replace(tmp, out / "results.json")
    tmp = out / "results.csv.partial"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIDELITY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in frows:
            w.writerow(r)
    os.replace(tmp, out / "results.csv")
    _fidelity_table(cfg, out / "table.md", frows, runs, models)
    _fidelity_plot(cfg, out / "fidelity_vs_time.png", frows)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Run (or resume) an unlearning grid from a TOML config.")
    ap.add_argument("config")
    ap.add_argument("--out", help="override the config's output directory")
    ap.add_argument("--fresh", action="store_true", help="discard the rows of earlier runs in the output directory")
    args = ap.parse_args(argv)
    cfg = GridConfig.load(args.config)
    if args.out:
        cfg.out = args.out
    run_grid(cfg, fresh=args.fresh, command="python experiments/grid.py " + " ".join(argv or sys.argv[1:]))
    print(Path(cfg.out) / "table.md")
    return 0
