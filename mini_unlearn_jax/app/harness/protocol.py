"""The field's benchmark protocol for networks (Deep Unlearn, Cadet et al. 2024; the NeurIPS 2023
unlearning challenge), run on any registered network method.

The protocol (:class:`ProtocolConfig`, read from a TOML file such as
``experiments/cnn_benchmark/config.toml``):

- **Splits.** The training pool (``data``) loses a seeded ``val_fraction`` (15 %) to the
  *validation split*, never trained on: trajectory unlearning reads it as its held-out set,
  and every method is tuned on it. The test set is read by nobody but the final metrics. The
  splits and the removal requests come from ``split_seed`` alone, so every model seed faces the
  same forget set (what the per-example forget score needs).
- **Three removal requests** on the rest: ``random10`` (a random ``forget_fraction``, 10 %);
  ``class`` (every training example of ``forget_class``); ``mislabelled`` (a random
  ``mislabel_fraction``, 5 %, gets a random other label *before training*, and exactly those
  examples are removed: the data-correction use; its original model is trained on the
  corrupted labels, and its forget accuracy is measured against them).
- **Models.** For each ``seed``: the recipe (``model``, Adam with a cosine schedule by default)
  trains an original on the clean and one on the corrupted labels, each keeping a trajectory
  buffer; retraining (the registry's ground truth) on each request's remaining data is the
  reference, timed with compilation apart.
- **Tuning on the validation split.** On ``tune_seed`` every method runs each point of its
  grid (``grids``; options of :func:`~mini_unlearn_jax.core.registry.run_method`); a point is
  scored by :func:`tuning_score`, Deep Unlearn's objective with the retrained model's attack
  accuracy as the target (the retrained model's value, not 0.5: a class the retrained model
  never saw is *not* indiscernible from validation data); the best point is the method's
  setting for that request on every seed. Its score and every point's are kept in
  ``tuning.jsonl``.
- **Metrics** (:func:`model_metrics`, on the unread test set): retain / forget / test
  accuracy; the population attack (:func:`~mini_unlearn_jax.evaluation.attacks.population_attack`,
  forget set against test images: ``auc`` and ``indiscernibility``); run time with
  compilation apart and ``rte`` = retraining time / method time; ``within_budget`` is the
  challenge's admission rule (time at most ``budget``, 0.2, of retraining's). The forget
  score of the challenge (per-example epsilons from the logit-scaled confidence of every
  seed's unlearned and retrained model) is computed over the seeds by the report
  (``protocol_report.py``), from the confidences kept in ``phi/``.

Every result is a row of ``results.jsonl`` (one per method, request and seed), appended as soon
as it is done; a rerun skips rows already there (``--fresh`` starts over), so an interrupted run
resumes. A progress line with an estimate of the time left follows every run; each invocation
that ran something adds its whole time to ``runs.jsonl``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tomllib

from ...core import registry as R
from ...core.models import Objective, build_model, init_params, make_objective
from ...core.problem import Problem, keep_mask
from ...core.snapshots import log_schedule, trajectory_buffer
from ...core.training import TrainConfig, Trainer
from ...core.unlearning import make_problem
from ...evaluation import metrics as mt
from ...evaluation.attacks import logit_confidence, loss_score, population_attack
from ..data import Dataset, load_dataset
from .config import append_row, check_row_store, read_rows

REQUESTS = ("random10", "class", "mislabelled")
_TRAINING_WEIGHT = 6.0  # a training costs about this many method runs (each at most 0.2 of it, plus evaluation)


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    """One benchmark: the data, the recipe, the requests, the methods and their tuning grids.

    Attributes:
      out: the output directory (results.jsonl, tuning.jsonl, phi/, the report).
      data: a :func:`~mini_unlearn_jax.app.data.load_dataset` spec: its training split is the
        pool (validation + retain + forget), its test split the unread test set.
      model, l2: the model (:func:`~mini_unlearn_jax.core.models.build_model` name) and its L2.
      optimizer, learning_rate, lr_schedule, epochs, batch_size: the training recipe.
      trajectory_size: snapshots in the trajectory buffer (log-spaced).
      val_fraction, forget_fraction, mislabel_fraction, forget_class, split_seed: the protocol.
      seeds: model seeds (initialisation and batch order); ``tune_seed`` (one of them) tunes.
      requests: which of ``REQUESTS`` to run.
      methods: registered method names (``retrain``, the reference, is always run).
      grids: ``{method: [options, ...]}``; a method without a grid runs its defaults.
      budget: the challenge's admission rule, as a fraction of retraining's time.
    """

    out: str
    data: str = "fashion_mnist:n_train=12000"
    model: str = "cnn"
    l2: float = 5e-4
    optimizer: str = "adam"
    learning_rate: float = 2e-3
    lr_schedule: str = "cosine"
    epochs: int = 10
    batch_size: int = 128
    trajectory_size: int = 12
    val_fraction: float = 0.15
    forget_fraction: float = 0.10
    mislabel_fraction: float = 0.05
    forget_class: int = 0
    split_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    tune_seed: int = 0
    requests: tuple[str, ...] = REQUESTS
    methods: tuple[str, ...] = ("mini",)
    grids: dict = dataclasses.field(default_factory=dict)
    budget: float = 0.2

    def __post_init__(self):
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "requests", tuple(self.requests))
        object.__setattr__(self, "methods", tuple(self.methods))
        if unknown := set(self.requests) - set(REQUESTS):
            raise ValueError(f"unknown requests {sorted(unknown)}: choose from {', '.join(REQUESTS)}")
        if self.tune_seed not in self.seeds:
            raise ValueError(f"tune_seed {self.tune_seed} must be one of the seeds {list(self.seeds)}")
        for name in self.methods:
            R.get_method(name)  # unknown names fail here, with the choices
        if unknown := set(self.grids) - set(self.methods):
            raise ValueError(f"grids for methods not in the benchmark: {sorted(unknown)}")
        for name, grid in self.grids.items():
            if not grid or not all(isinstance(g, dict) for g in grid):
                raise ValueError(f"grids.{name} must be a non-empty list of option tables")
        for f in ("val_fraction", "forget_fraction", "mislabel_fraction", "budget"):
            if not 0 < getattr(self, f) < 1:
                raise ValueError(f"{f} must lie in (0, 1), got {getattr(self, f)}")

    @classmethod
    def load(cls, path: str | Path, **overrides) -> ProtocolConfig:
        """The config of a TOML file (``out`` relative to the file's directory unless absolute),
        with ``overrides`` replacing its keys."""
        path = Path(path)
        raw = tomllib.loads(path.read_text())
        raw.update({k: v for k, v in overrides.items() if v is not None})
        if unknown := set(raw) - {f.name for f in dataclasses.fields(cls)}:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        out = Path(raw.get("out", "results"))
        raw["out"] = str(out if out.is_absolute() else path.parent / out)
        return cls(**raw)

    def recipe(self, n_train: int, seed: int) -> TrainConfig:
        steps = self.epochs * max(1, -(-n_train // self.batch_size))
        return TrainConfig(optimizer=self.optimizer, learning_rate=self.learning_rate, lr_schedule=self.lr_schedule,
                           steps=steps, batch_size=self.batch_size, tol=0.0, seed=seed, snapshots=0, chunk=steps)


# -- splits and requests --------------------------------------------------------------------


class Splits(NamedTuple):
    """The protocol's data: the training set (validation removed), the validation split, the
    unread test set, the corrupted labels of the mislabelled request and each request's forget
    indices (into ``x``)."""

    x: np.ndarray
    y: np.ndarray
    y_corrupted: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    forget: dict[str, np.ndarray]


def make_splits(ds: Dataset, cfg: ProtocolConfig) -> Splits:
    """Split ``ds`` as the protocol says (module docstring), from ``cfg.split_seed`` alone."""
    rng = np.random.default_rng([cfg.split_seed, 2024])
    n_pool = len(ds.y_train)
    perm = rng.permutation(n_pool)
    n_val = int(round(cfg.val_fraction * n_pool))
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    x, y = ds.x_train[train], ds.y_train[train].astype(np.int32)
    n = len(y)
    if not 0 <= cfg.forget_class < ds.num_classes:
        raise ValueError(f"forget_class {cfg.forget_class} is not a class of {ds.spec} (0..{ds.num_classes - 1})")
    flipped = np.sort(rng.choice(n, int(round(cfg.mislabel_fraction * n)), replace=False))
    y_bad = y.copy()
    y_bad[flipped] = (y[flipped] + rng.integers(1, ds.num_classes, flipped.size)) % ds.num_classes
    forget = {"random10": np.sort(rng.choice(n, int(round(cfg.forget_fraction * n)), replace=False)),
              "class": np.flatnonzero(y == cfg.forget_class).astype(np.int64),
              "mislabelled": flipped.astype(np.int64)}
    return Splits(x, y, y_bad, ds.x_train[val], ds.y_train[val].astype(np.int32), ds.x_test,
                  ds.y_test.astype(np.int32), forget)


def request_labels(splits: Splits, request: str) -> np.ndarray:
    """The training labels the request's original model was trained on."""
    return splits.y_corrupted if request == "mislabelled" else splits.y


# -- metrics --------------------------------------------------------------------------------


def model_metrics(objective: Objective, params, x, y, forget, x_other, y_other, *, seed: int = 0) -> dict | None:
    """``retain_acc``, ``forget_acc``, ``other_acc`` (on ``x_other``: the test set, or the
    validation split when tuning) and the population attack, forget set against ``x_other``
    (``auc``, ``mia_accuracy``, ``indiscernibility``). None when the model's predictions are not
    finite (finite parameters so large that the softmax overflows: a diverged method)."""
    keep = np.flatnonzero(keep_mask(len(y), forget))
    p_f = mt.predict_probs(objective, params, x[forget])
    p_o = mt.predict_probs(objective, params, x_other)
    if not (np.isfinite(p_f).all() and np.isfinite(p_o).all()):
        return None
    out = {"retain_acc": mt.accuracy(mt.predict_probs(objective, params, x[keep]), y[keep]),
           "forget_acc": mt.accuracy(p_f, y[forget]), "other_acc": mt.accuracy(p_o, y_other)}
    mia = population_attack(-loss_score(p_f, y[forget]), -loss_score(p_o, y_other), seed=seed)
    return out | {"auc": mia["auc"], "mia_accuracy": mia["accuracy"], "indiscernibility": mia["indiscernibility"]}


def tuning_score(unlearned: dict, retrained: dict) -> float:
    """Deep Unlearn's tuning objective on the validation split (lower is better):
    ``sqrt((dRA/3)^2 + (dFA/3)^2 + (dVA/3)^2 + (dMIA/0.5)^2)``, the ``d``s the absolute gaps of
    the retain, forget and validation accuracy and of the population attack's accuracy (forget
    set against the validation split) to the retrained model's. Deep Unlearn's last term is the
    distance to 0.5; the retrained model's own value replaces it here, since a forgotten class or
    a set of mislabelled examples stays discernible from validation data after retraining."""
    d = lambda k: abs(unlearned[k] - retrained[k])
    return float(np.sqrt((d("retain_acc") / 3) ** 2 + (d("forget_acc") / 3) ** 2 + (d("other_acc") / 3) ** 2
                         + (d("mia_accuracy") / 0.5) ** 2))


# -- the run --------------------------------------------------------------------------------


class _Original(NamedTuple):
    problem: Problem
    train_s: float
    compile_s: float


def _train(cfg: ProtocolConfig, splits: Splits, labels: np.ndarray, seed: int, num_classes: int) -> _Original:
    module = build_model(cfg.model, num_classes)
    objective = make_objective(module, cfg.l2)
    recipe = cfg.recipe(len(labels), seed)
    params0 = init_params(module, splits.x[0], seed)
    trainer = Trainer(objective, recipe, trajectory=trajectory_buffer(log_schedule(recipe.steps, cfg.trajectory_size)))
    t0 = time.perf_counter()
    state = trainer.fit(params0, jnp.asarray(splits.x), jnp.asarray(labels))
    jax.block_until_ready(state.params)
    wall = time.perf_counter() - t0
    problem = make_problem(objective, state.params, splits.x, labels, recipe=recipe, params0=params0,
                           trajectory=state.trajectory, heldout=(splits.x_val, splits.y_val))
    return _Original(problem, wall - trainer.compile_s, trainer.compile_s)


def _label(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(options.items())) or "defaults"


_ROW_KEYS = {"results.jsonl": {"method", "request", "seed"}, "tuning.jsonl": {"method", "request", "seed"},
             "runs.jsonl": {"command", "seconds"}}


def _check_ours(out: Path) -> None:
    """Raise unless what ``out`` holds of this benchmark's files is this benchmark's: its row
    stores hold its rows, and report files stand only beside the rows they were written from."""
    from .protocol_report import REPORT_FILES

    for name, need in _ROW_KEYS.items():
        check_row_store(out / name, lambda row, need=need: need <= set(row), "this benchmark's row store")
    if not (out / "results.jsonl").exists() and (found := [n for n in REPORT_FILES if (out / n).exists()]):
        raise ValueError(f"{out} holds {', '.join(found)} but no results.jsonl: this benchmark did not write them, "
                         "and its report would replace them; they are left as they are: choose another output "
                         "directory")


def discard_earlier(out: Path) -> None:
    """What ``--fresh`` deletes: the row stores of ``out`` and the report written from them
    (checked to be this benchmark's) and the confidence files its rows name
    (``phi/{request}__{method or retrain}__{seed}.npy``); any other file is left alone."""
    from .protocol_report import REPORT_FILES

    _check_ours(out)
    names = set()
    for r in read_rows(out / "results.jsonl"):
        names |= {f"{r['request']}__{m}__{r['seed']}.npy" for m in (r["method"], "retrain")}
    for name in names:
        (out / "phi" / name).unlink(missing_ok=True)
    for name in (*REPORT_FILES, *_ROW_KEYS):
        (out / name).unlink(missing_ok=True)


def run_protocol(cfg: ProtocolConfig, *, fresh: bool = False, log=print, device: str | None = None,
                 command: str = "") -> list[dict]:
    """Run every (request, seed, method) of ``cfg`` not yet in ``cfg.out`` and write the report;
    returns the rows of ``results.jsonl``."""
    from .protocol_report import write_report
    from .run import machine_info

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        discard_earlier(out)  # checks the row stores are this benchmark's first
    else:
        _check_ours(out)  # a foreign row store would get this benchmark's rows appended
    (out / "phi").mkdir(exist_ok=True)
    device = device or str(jax.devices()[0].platform)
    t_start = time.perf_counter()
    ds = load_dataset(cfg.data)
    splits = make_splits(ds, cfg)
    seeds = (cfg.tune_seed, *[s for s in cfg.seeds if s != cfg.tune_seed])
    done = {(r["request"], int(r["seed"]), r["method"]) for r in read_rows(out / "results.jsonl")}
    tuned = {}
    for r in read_rows(out / "tuning.jsonl"):
        tuned.setdefault((r["request"], r["method"]), {})[r["options_label"]] = r
    todo = [(q, s, m) for s in seeds for q in cfg.requests for m in cfg.methods if (q, s, m) not in done]
    grid_of = lambda m: [dict(g) for g in cfg.grids.get(m, [{}])]
    runs = sum(len(grid_of(m)) if s == cfg.tune_seed else 1 for q, s, m in todo)
    pending_rows = set(todo)
    pending = {(q, s) for q, s, _ in todo}
    trainings = len(pending) + len({(s, q == "mislabelled") for q, s in pending})  # retrains + originals
    log(f"benchmark: {len(todo)} of {len(seeds) * len(cfg.requests) * len(cfg.methods)} (request, seed, method) "
        f"rows to run ({runs} method runs, tuning included, and {trainings} trainings) -> {out}")
    # for the estimate of the time left, a training (or retraining) counts as _TRAINING_WEIGHT method runs
    progress = {"done": 0.0, "total": runs + _TRAINING_WEIGHT * trainings, "t0": time.perf_counter(), "runs": 0}

    def tick(what: str, weight: float = 1.0) -> None:
        progress["done"] += weight
        progress["runs"] += weight == 1.0
        el = time.perf_counter() - progress["t0"]
        eta = el / progress["done"] * (progress["total"] - progress["done"])
        log(f"[{progress['runs']}/{runs}] {what}  elapsed {el / 60:.1f} min, about {eta / 60:.1f} min left")

    originals: dict = {}
    for seed in seeds:
        for request in cfg.requests:
            methods = [m for m in cfg.methods if (request, seed, m) in pending_rows]
            if not methods:
                continue
            labels = request_labels(splits, request)
            corrupt = request == "mislabelled"
            if (seed, corrupt) not in originals:
                originals = {k: v for k, v in originals.items() if k[0] == seed}  # one seed's models in memory
                log(f"seed {seed}: training the original on the {'corrupted' if corrupt else 'clean'} labels")
                originals[(seed, corrupt)] = _train(cfg, splits, labels, seed, ds.num_classes)
                tick(f"seed {seed}: trained in {originals[(seed, corrupt)].train_s:.1f} s", _TRAINING_WEIGHT)
            orig = originals[(seed, corrupt)]
            problem, forget = orig.problem, splits.forget[request]
            ref = R.run_method(R.ground_truth_method(), problem, forget)
            if not ref.converged:
                raise RuntimeError(f"retraining diverged for {request}, seed {seed}: {ref.reason}")
            tick(f"seed {seed}, {request}: retrained in {ref.time_s:.1f} s (+{ref.compile_s:.1f} s compilation)",
                 _TRAINING_WEIGHT)
            x = splits.x
            ev = _Evaluation(problem.objective, splits, labels, forget, seed)
            val, test, phi = ev.validation, ev.test, ev.confidence
            ref_val, ref_test, orig_test = val(ref.params), test(ref.params), test(problem.params)
            np.save(out / "phi" / f"{request}__retrain__{seed}.npy", phi(ref.params))
            for name in methods:
                if seed == cfg.tune_seed:
                    best = None
                    for options in grid_of(name):
                        res, wall = _timed_run(name, problem, forget, options)
                        m_val = val(res.params) if res.converged else None
                        score = float("inf") if m_val is None else tuning_score(m_val, ref_val)
                        row = {"method": name, "request": request, "seed": seed, "options": options,
                               "options_label": _label(options), "score": score, "converged": bool(res.converged),
                               "time_s": res.time_s, "retrain_time_s": ref.time_s}
                        append_row(out / "tuning.jsonl", row)
                        tuned.setdefault((request, name), {})[row["options_label"]] = row
                        tick(f"tune {request} {name} {row['options_label']}: score {score:.4f}")
                        if best is None or score < best[0]:
                            best = (score, options, res, wall)
                    _, options, res, wall = best
                else:
                    rows = tuned.get((request, name))
                    if not rows:
                        raise RuntimeError(f"{name} on {request} has no tuning rows: run tune_seed {cfg.tune_seed} first")
                    options = min(rows.values(), key=lambda r: r["score"])["options"]
                    res, wall = _timed_run(name, problem, forget, options)
                    tick(f"{request} seed {seed} {name} {_label(options)}")
                m = (test(res.params) if res.converged else None) or {}
                reason = res.reason if not res.converged or m else f"{res.reason}; its predictions are not finite"
                np.save(out / "phi" / f"{request}__{name}__{seed}.npy", phi(res.params))
                row = {"method": name, "request": request, "seed": seed, "options": options,
                       "converged": bool(res.converged and m), "reason": reason,
                       "test_acc": m.get("other_acc"),
                       **{k: m.get(k) for k in ("forget_acc", "retain_acc", "auc", "mia_accuracy", "indiscernibility")},
                       **{f"retrain_{k}": ref_test[k]
                          for k in ("forget_acc", "retain_acc", "auc", "mia_accuracy", "indiscernibility")},
                       "retrain_test_acc": ref_test["other_acc"],
                       **{f"original_{k}": orig_test[k] for k in ("forget_acc", "retain_acc", "auc")},
                       "original_test_acc": orig_test["other_acc"],
                       "time_s": res.time_s, "compile_s": res.compile_s, "wall_s": wall,
                       "retrain_time_s": ref.time_s, "retrain_compile_s": ref.compile_s,
                       "train_time_s": orig.train_s, "rte": ref.time_s / max(res.time_s, 1e-9),
                       "within_budget": bool(res.time_s <= cfg.budget * ref.time_s),
                       "n_train": len(x), "n_forget": int(len(forget)), "n_val": len(splits.y_val),
                       "n_test": len(splits.y_test), "device": device, "info": _jsonable(res.info)}
                append_row(out / "results.jsonl", row)
    rows = read_rows(out / "results.jsonl")
    total = time.perf_counter() - t_start
    if todo:  # an invocation that ran something: its whole time, for the report
        append_row(out / "runs.jsonl", {"command": command, "seconds": total, "rows_run": len(todo),
                                        "device": device, "machine": machine_info()})
    write_report(cfg, rows, read_rows(out / "tuning.jsonl"), read_rows(out / "runs.jsonl"), out, command=command)
    log(f"benchmark: done in {total / 60:.1f} min; report in {out / 'table.md'}")
    return rows


class _Evaluation(NamedTuple):
    """One request's figures for any parameters: on the validation split (tuning), on the test
    set (the report), and the forget set's logit-scaled confidences (the forget score)."""

    objective: Objective
    splits: Splits
    labels: np.ndarray
    forget: np.ndarray
    seed: int

    def validation(self, params) -> dict:
        s = self.splits
        return model_metrics(self.objective, params, s.x, self.labels, self.forget, s.x_val, s.y_val, seed=self.seed)

    def test(self, params) -> dict:
        s = self.splits
        return model_metrics(self.objective, params, s.x, self.labels, self.forget, s.x_test, s.y_test, seed=self.seed)

    def confidence(self, params) -> np.ndarray:
        logits = self.objective.logits(params, jnp.asarray(self.splits.x[self.forget]))
        return np.asarray(logit_confidence(logits, jnp.asarray(self.labels[self.forget])), np.float32)


def _timed_run(name: str, problem: Problem, forget, options: dict):
    t0 = time.perf_counter()
    res = R.run_method(name, problem, forget, **options)
    jax.block_until_ready(res.params)
    return res, time.perf_counter() - t0


def _jsonable(d: dict) -> dict:
    keep = {}
    for k, v in d.items():
        if isinstance(v, (bool, int, float, str)) or v is None:
            keep[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(e, (bool, int, float, str)) for e in v):
            keep[k] = list(v)
    return keep
