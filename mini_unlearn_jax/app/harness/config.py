"""The grid's configuration (GridConfig, ratio and method labels) and its rows on disk."""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np

from ...core import registry as R
from ...core.training import TrainConfig
from .. import recipes

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


def read_rows(path: str | Path) -> list[dict]:
    """The JSON rows of the JSON-lines file ``path``, in order (``[]`` when it does not exist); a
    line that is not JSON (cut by an interruption) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def append_row(path: str | Path, row: dict) -> None:
    """Append ``row`` to ``path`` as one JSON line, after ending a last line an interruption cut
    (so the cut line stays one unreadable line and the new row stays whole)."""
    end_cut_line(path)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=float) + "\n")


def end_cut_line(path: str | Path) -> None:
    """End the last line of ``path`` with a newline if an interrupted write left it without one."""
    path = Path(path)
    if not path.exists() or not path.stat().st_size:
        return
    with open(path, "rb+") as f:
        f.seek(-1, 2)
        if f.read(1) != b"\n":
            f.write(b"\n")


def check_row_store(path: str | Path, is_row, what: str = "a row store of this harness") -> None:
    """Raise ValueError unless every line of ``path`` is a JSON object that ``is_row`` accepts (a
    last line cut by an interruption aside): ``--fresh`` deletes only files this tool wrote."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and bool(is_row(row))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue  # a last line cut by an interruption (read_rows skips it too)
            ok = False
        if not ok:
            raise ValueError(f"{path} is not {what} (line {i + 1} is not one of its rows); it is left as it is: "
                             "choose another output directory")


def _is_grid_row(row: dict) -> bool:
    try:
        key_of(row)
    except (KeyError, TypeError, ValueError):
        return False
    return True


def key_of(row: dict) -> tuple:
    return (row["data"], row["model"], int(row["seed"]), str(row["ratio"]), row["method"])


def load_rows(out: str | Path) -> list[dict]:
    """The rows of ``out/results.jsonl``, the last one of each cell (a line cut by an interruption is dropped)."""
    rows: dict = {}
    for row in read_rows(Path(out) / "results.jsonl"):
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


