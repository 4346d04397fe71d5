"""Training a grid's models and running and scoring its cells against their references."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from ...core import methods as M
from ...core import registry as R
from ...core.snapshots import nbytes
from ...evaluation import attacks as A
from ...evaluation import metrics as mt
from ...evaluation.compare import compare
from .. import recipes
from .config import FORGET_SCORE_MIN_SEEDS, GridConfig, parse_method, parse_ratio

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


