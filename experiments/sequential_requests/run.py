"""A stream of deletion requests on the leaky MLP: does every request leave a run as honest as
retraining, in its model and in every parameter set it stores?

Setting: the leaky MLP (recipes "leaky-mlp": 2,000 Fashion-MNIST training images, 784-256-10,
1,600 Adam steps, train accuracy 1.0, so the trained model leaks membership), trained once per
seed with a trajectory buffer, so ``mini`` is trajectory unlearning. Then ``--requests``
successive deletion requests, each of ``--fraction`` of the *original* training set drawn at
random (seeded) from the examples still present. Request ``i``:

- ``run_method("mini", cur, local)`` on the current problem (``local``: the request's rows in it,
  which after a refresh holds only the remaining rows), then
  ``refresh_for_next_request(cur, params, local, buffers)``: the next problem stores the unlearned
  model, the trajectory the method rebuilt and a snapshot buffer built at the new model on the
  remaining data. Both are timed, compilation apart;
- the reference: the recipe rerun from the initialisation on everything not yet removed
  (``retrain`` on the original problem with all requests so far), timed, compilation apart;
- the audit (:func:`~mini_unlearn_jax.evaluation.audit.audit_params`, the loss attack):
  members = every example removed so far, non-members = the test images the method never read
  (all but the trajectory run's held-out split), balanced in count (seeded). Audited: the model
  and every parameter set the current problem stores
  (:func:`~mini_unlearn_jax.app.audit.stored_param_sets`: each written trajectory slot, each
  written snapshot-buffer slot, the initial parameters); as reference, the cumulative retrain's
  model (and, for context, the original trained model and an independent retrain at another
  seed's initialisation and batch order, the reference's own noise) on the same members and
  non-members.

The criteria, per (seed, request): the model within ``AUC_TOL`` of the retrain's AUC
(``|AUC - retrain AUC| <= 0.03``), every stored artefact at most ``AUC_TOL`` above it, and test
accuracy (on the unread test images) within ``ACC_TOL_PTS`` points of the retrain's. Nothing is
tuned to meet them. Also checked: no trajectory slot after the request's rewind point holds a
snapshot of the original training run. Timings: the fastest of ``--repeats`` runs (the outputs
are deterministic; the machine's other load only slows a run down), the retrain's of at most 2.

    python experiments/sequential_requests/run.py       # writes experiments/sequential_requests/results/
    python experiments/sequential_requests/run.py --smoke --out /tmp/seq-smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np

import mini_unlearn_jax as mu
from mini_unlearn_jax.app import recipes
from mini_unlearn_jax.app.audit import stored_param_sets
from mini_unlearn_jax.app.harness import library_version, machine_info
from mini_unlearn_jax.core import methods as M
from mini_unlearn_jax.core.models import init_params
from mini_unlearn_jax.evaluation.audit import audit_params
from mini_unlearn_jax.evaluation.metrics import accuracy, predict_probs

RECIPE = "leaky-mlp"  # the setting (data, model, l2, Adam recipe): mini_unlearn_jax/app/recipes.py
SCRIPT = "experiments/sequential_requests/run.py"
AUC_TOL = 0.03  # the model and every stored artefact against the cumulative retrain's AUC
ACC_TOL_PTS = 1.5  # test accuracy against the cumulative retrain's, in points
REQUEST_SEED = 29  # with the seed, draws the requests
OTHER_SEED = 1000  # the independent retrain trains at seed + this (initialisation and batch order)
# --smoke: a synthetic problem small enough for the test suite
SMOKE = {"data": "synthetic:n=400,n_test=400,d=20,classes=3,seed=1", "steps": 200, "hidden": 32}
SMOKE_REQUESTS = 3
CRITERIA = ("model_ok", "stored_ok", "acc_ok", "all_ok")
DIAGNOSTICS = ("stored_after_init_ok", "other_seed_model_ok", "other_seed_acc_ok")

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[sequential_requests {time.perf_counter() - T0:6.0f}s] {msg}", file=sys.stderr, flush=True)


class Progress:
    """Progress over the (seed, request) cells, with the time left extrapolated from those done
    (each seed's training counted in its first cell)."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        el = time.perf_counter() - self.t0
        eta = el / self.done * (self.total - self.done)
        log(f"[{self.done}/{self.total}] {what} ({el:.0f}s elapsed, ETA {eta:.0f}s)")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="training seeds (initialisation, batch order) and request draws")
    p.add_argument("--requests", type=int, default=10, help="successive deletion requests per seed")
    p.add_argument("--fraction", type=float, default=0.02,
                   help="each request removes this fraction of the original training set")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of the solve and the refresh (the fastest is reported; the retrain: at most 2)")
    p.add_argument("--out", help="output folder (default: experiments/sequential_requests/results)")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny setting for the tests ({SMOKE['data']}, {SMOKE['steps']} steps, hidden "
                        f"{SMOKE['hidden']}, {SMOKE_REQUESTS} requests, the first seed, one timed run); needs --out")
    a = p.parse_args(argv)
    if a.smoke:
        if a.out is None:
            p.error("--smoke writes a scratch result: give --out (the committed results stay as they are)")
        a.seeds, a.requests, a.repeats = a.seeds[:1], SMOKE_REQUESTS, 1
    a.out = a.out or "experiments/sequential_requests/results"
    if len(set(a.seeds)) != len(a.seeds):
        p.error(f"--seeds must be distinct, got {a.seeds}")
    if a.requests < 1 or a.repeats < 1 or not 0 < a.fraction < 1:
        p.error("--requests and --repeats must be >= 1 and --fraction in (0, 1)")
    return a


def train(seed: int, args) -> recipes.Trained:
    """The leaky MLP (or the smoke setting) at ``seed``, with a trajectory buffer and the recipe's
    snapshot buffer (``trajectory=True``)."""
    extra = dict(SMOKE) if args.smoke else {}
    return recipes.recipe(RECIPE, seed, trajectory=True, **extra)


def draw_requests(n: int, requests: int, size: int, seed: int) -> list[np.ndarray]:
    """``requests`` sorted arrays of ``size`` original training indices each, every one drawn at
    random (seeded by ``seed``) from the examples no earlier request removed."""
    if requests * size > n:
        raise SystemExit(f"{requests} requests of {size} exceed the {n} training examples")
    rng = np.random.default_rng([seed, REQUEST_SEED])
    alive, out = np.arange(n), []
    for _ in range(requests):
        chunk = np.sort(rng.choice(alive, size=size, replace=False))
        out.append(chunk)
        alive = np.setdiff1d(alive, chunk)
    return out


def fastest(run, repeats: int):
    """``run()`` ``repeats`` times: the output with the smallest ``time_s``, with the compile time of
    the first run (the later ones find the program compiled)."""
    outs = [run() for _ in range(max(1, repeats))]
    return min(outs, key=lambda o: o.time_s)._replace(compile_s=outs[0].compile_s)


def other_seed_problem(tr: recipes.Trained, seed: int) -> mu.Problem:
    """The original problem with the recipe's seed (initialisation and batch order) set to ``seed``:
    its ``retrain`` is an independent retrain, whose distance to the reference is the reference's
    own noise."""
    cfg = dataclasses.replace(tr.problem.recipe, seed=seed)
    return dataclasses.replace(tr.problem, train_config=cfg, params0=init_params(tr.model, tr.dataset.x_train[0], seed))


def worst_kind(name: str, k: int) -> str:
    """What the stored artefact ``name`` is, for a request that rewound to slot ``k``."""
    if name == "params0" or name.startswith("trajectory[0] "):
        return "the initialisation"
    if name.startswith("trajectory["):
        j = int(name[len("trajectory["):name.index("]")])
        return "a trajectory slot kept (at or before the rewind point)" if j <= k else \
            "a trajectory slot rewritten (after the rewind point)"
    return "a snapshot-buffer slot" if name.startswith("snapshots[") else name


def _same(a, b) -> bool:
    return all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                                             strict=True))


def original_slots_after_rewind(traj, original, k: int) -> list[list[int]]:
    """``[slot j, original slot i]`` for every slot ``j > k`` of the trajectory ``traj`` whose
    parameters equal (bit for bit) slot ``i`` of the original training run's trajectory
    ``original``: a stored snapshot of the original run after the rewind point ``k`` (expected:
    none; trajectory unlearning rewrites every later slot along its retraining phase)."""
    slot = lambda s, i: jax.tree.map(lambda a: a[i], s.params)
    K, K0 = int(traj.steps.shape[0]), int(original.steps.shape[0])
    written = np.asarray(original.steps) >= 0
    return [[j, i] for j in range(k + 1, K) for i in range(K0)
            if written[i] and _same(slot(traj, j), slot(original, i))]


def run_seed(seed: int, args, progress: Progress) -> tuple[list[dict], dict]:
    """Train, then the stream of requests: one record per request, and the seed's setting."""
    tr = train(seed, args)
    pb, ds = tr.problem, tr.dataset
    obj = pb.objective
    n = int(pb.x.shape[0])
    size = max(1, int(round(args.fraction * n)))
    unread = recipes.unread_test_indices(len(ds.x_test), tr.val_indices)
    x_non, y_non = ds.x_test[unread], ds.y_test[unread]
    test_acc = lambda w: accuracy(predict_probs(obj, w, x_non), y_non)
    original_traj = pb.extras["trajectory"].state
    other = other_seed_problem(tr, seed + OTHER_SEED)
    setting = {"n_train": n, "request_size": size, "n_val": int(len(tr.val_indices)), "n_unread_test": int(len(unread)),
               "train_s": tr.train_s, "train_compile_s": tr.train_compile_s,
               "train_acc": accuracy(predict_probs(obj, pb.params, ds.x_train), ds.y_train),
               "test_acc": test_acc(pb.params), "trajectory_steps": np.asarray(original_traj.steps).tolist(),
               "recipe_steps": int(pb.recipe.steps)}
    log(f"seed {seed}: trained ({tr.train_s:.1f}s + {tr.train_compile_s:.1f}s compile), train acc "
        f"{setting['train_acc']:.4f}, test acc {setting['test_acc']:.4f}; {args.requests} requests of {size}")
    requests = draw_requests(n, args.requests, size, seed)
    cur, alive, removed = pb, np.arange(n), np.zeros(0, np.int64)
    records = []
    for i, chunk in enumerate(requests, start=1):
        local = np.searchsorted(alive, chunk).astype(np.int32)
        assert np.array_equal(alive[local], chunk)
        out = fastest(lambda cur=cur, local=local: mu.run_method("mini", cur, local), args.repeats)
        ref = fastest(lambda cur=cur, local=local, out=out: M.refresh_for_next_request(
            cur, out.params, local, out.buffers), args.repeats)
        cur = ref.problem
        alive = np.setdiff1d(alive, chunk)
        removed = np.sort(np.concatenate([removed, chunk]))
        ret = fastest(lambda removed=removed: mu.run_method("retrain", pb, removed), min(2, args.repeats))
        ret_other = mu.run_method("retrain", other, removed)
        # what the run stores now: the model, the trajectory slots, the snapshot-buffer slots, params0
        run = SimpleNamespace(params=out.params, meta={}, trajectory=cur.extras["trajectory"].state,
                              snapshots=cur.snapshots, params0=cur.params0)
        sets, steps = stored_param_sets(run)
        xf, yf = ds.x_train[removed], ds.y_train[removed]
        report = audit_params(obj, sets, xf, yf, x_non, y_non, steps=steps, tolerance=AUC_TOL, seed=seed)
        reference = audit_params(obj, {"model": ret.params, "original": pb.params, "other_seed": ret_other.params},
                                 xf, yf, x_non, y_non, tolerance=AUC_TOL, seed=seed)
        ref_auc = {r.name: r.auc for r in reference.rows}
        stored = [r for r in report.rows if r.name != report.model]
        worst = max(stored, key=lambda r: r.auc)
        ret_auc = reference.model_auc
        acc_u, acc_r, acc_o = test_acc(out.params), test_acc(ret.params), test_acc(ret_other.params)
        k = int(out.info["rewind_index"])
        aucs = {r.name: r.auc for r in report.rows}
        rec = {
            "seed": seed, "request": i, "n_request": int(chunk.size), "n_removed": int(removed.size),
            "n_remaining": int(cur.x.shape[0]), "converged": bool(out.converged), "reason": out.reason,
            "rewind_index": k, "rewind_step": int(out.info["rewind_step"]), "tau": float(out.info["tau"]),
            "model_auc": report.model_auc, "model_auc_se": next(r.auc_se for r in report.rows if r.name == "model"),
            "worst_stored_auc": worst.auc, "worst_stored": worst.name, "worst_stored_kind": worst_kind(worst.name, k),
            "init_auc": aucs["params0"],
            "worst_stored_auc_after_init": max(v for n, v in aucs.items() if n not in ("model", "params0")
                                               and not n.startswith("trajectory[0] ")),
            "retrain_auc": ret_auc, "retrain_auc_se": reference.rows[0].auc_se,
            "original_auc": ref_auc["original"], "other_seed_retrain_auc": ref_auc["other_seed"],
            "n_members": report.n_members, "n_nonmembers": report.n_nonmembers,
            "test_acc": acc_u, "retrain_test_acc": acc_r, "test_acc_pts": 100 * (acc_u - acc_r),
            "other_seed_retrain_test_acc": acc_o, "other_seed_retrain_test_acc_pts": 100 * (acc_o - acc_r),
            "solve_s": out.time_s, "solve_compile_s": out.compile_s,
            "refresh_s": ref.time_s, "refresh_compile_s": ref.compile_s,
            "retrain_s": ret.time_s, "retrain_compile_s": ret.compile_s,
            "time_ratio": (out.time_s + ref.time_s) / ret.time_s, "solve_time_ratio": out.time_s / ret.time_s,
            "trajectory_slot_steps": np.asarray(run.trajectory.steps).tolist(),
            "original_slots_after_rewind": original_slots_after_rewind(run.trajectory, original_traj, k),
            "audit": [{"name": r.name, "step": r.step, "auc": r.auc, "auc_se": r.auc_se} for r in report.rows],
        }
        rec["model_ok"] = abs(rec["model_auc"] - ret_auc) <= AUC_TOL
        rec["stored_ok"] = worst.auc <= ret_auc + AUC_TOL
        rec["acc_ok"] = abs(rec["test_acc_pts"]) <= ACC_TOL_PTS
        rec["all_ok"] = rec["model_ok"] and rec["stored_ok"] and rec["acc_ok"]
        # diagnostics, not criteria: the stored artefacts but the never-trained initialisation, and an
        # independent retrain held to the model's criteria
        rec["stored_after_init_ok"] = rec["worst_stored_auc_after_init"] <= ret_auc + AUC_TOL
        rec["other_seed_model_ok"] = abs(rec["other_seed_retrain_auc"] - ret_auc) <= AUC_TOL
        rec["other_seed_acc_ok"] = abs(rec["other_seed_retrain_test_acc_pts"]) <= ACC_TOL_PTS
        records.append(rec)
        progress.step(f"seed {seed}, request {i}: {removed.size} removed, rewound to step {rec['rewind_step']}, "
                      f"AUC model {rec['model_auc']:.3f} / worst stored {worst.auc:.3f} ({worst.name}) / retrain "
                      f"{ret_auc:.3f}, test acc {acc_u:.4f} (retrain {acc_r:.4f}), time ratio {rec['time_ratio']:.3f}"
                      f" (solve {out.time_s:.2f}s + refresh {ref.time_s:.2f}s vs retrain {ret.time_s:.2f}s)")
    return records, setting


def _stat(values, nd: int, sign: bool = False) -> str:
    """One value, or the mean over seeds with [min, max]."""
    f = f"{{:{'+' if sign else ''}.{nd}f}}"
    v = np.asarray(values, np.float64)
    return f.format(v[0]) if v.size == 1 else f"{f.format(v.mean())} [{f.format(v.min())}, {f.format(v.max())}]"


def table(results: dict) -> str:
    """The Markdown table: one row per request index (mean over seeds [min, max]), then the counts
    of (seed, request) cells that meet each criterion and the diagnostics."""
    recs, seeds = results["records"], results["seeds"]
    cells = "one seed" if len(seeds) == 1 else f"mean over seeds {seeds} [min, max]"
    L = [f"Command: `{results['command']}` (wall {results['wall_s']:.0f} s, device {results['device']}).", "",
         f"Each request removes {results['request_size']} of the {results['n_train']} original training images. AUC: "
         "the loss attack, members = every image removed so far, non-members = as many test images the method "
         "never read. Worst stored: the highest AUC among the parameter sets the run stores besides its model "
         "(trajectory slots, snapshot-buffer slots, the initialisation); init: the initialisation alone (it never "
         "trained on any image). Retrain: the recipe from the initialisation on everything not yet removed; "
         "other seed: the same retrain at another seed's initialisation and batch order; original: the trained "
         "model before any request. Test accuracy on the unread test images. Time ratios: (solve + refresh) / "
         f"retrain and solve / retrain, compilation apart. Values: {cells}.", "",
         "| request | removed | model AUC | worst stored AUC | init AUC | retrain AUC | other-seed retrain AUC | "
         "original AUC | test acc unlearned | test acc retrained | (solve + refresh) / retrain | solve / retrain | "
         "all criteria met |",
         "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i in sorted({r["request"] for r in recs}):
        rs = [r for r in recs if r["request"] == i]
        col = lambda k, nd, rs=rs: _stat([r[k] for r in rs], nd)
        L.append(f"| {i} | {rs[0]['n_removed']} | {col('model_auc', 3)} | {col('worst_stored_auc', 3)} | "
                 f"{col('init_auc', 3)} | {col('retrain_auc', 3)} | {col('other_seed_retrain_auc', 3)} | "
                 f"{col('original_auc', 3)} | {col('test_acc', 4)} | {col('retrain_test_acc', 4)} | "
                 f"{col('time_ratio', 3)} | {col('solve_time_ratio', 3)} | {sum(r['all_ok'] for r in rs)}/{len(rs)} |")
    c, d, n = results["criteria_met"], results["diagnostics_met"], len(recs)
    kinds: dict[str, int] = {}
    for r in recs:
        kinds[r["worst_stored_kind"]] = kinds.get(r["worst_stored_kind"], 0) + 1
    L += ["", f"Criteria met, of {n} (seed, request) cells: the model within {AUC_TOL} AUC of the retrain "
          f"{c['model_ok']}/{n}; every stored artefact at most {AUC_TOL} AUC above the retrain {c['stored_ok']}/{n}; "
          f"test accuracy within {ACC_TOL_PTS} points of the retrain's {c['acc_ok']}/{n}; all three {c['all_ok']}/{n}.",
          "",
          f"Diagnostics: every stored artefact but the initialisation at most {AUC_TOL} above the retrain "
          f"{d['stored_after_init_ok']}/{n}; the other-seed retrain within {AUC_TOL} AUC of the retrain "
          f"{d['other_seed_model_ok']}/{n} and within {ACC_TOL_PTS} points of its test accuracy "
          f"{d['other_seed_acc_ok']}/{n}. The worst stored artefact was "
          + "; ".join(f"{k} in {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
          + f" of the {n} cells. Stored trajectory slots after a request's rewind point equal to a snapshot of the "
          f"original training run: {results['original_slots_after_rewind']}."]
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    command = "python " + " ".join([SCRIPT] + [shlex.quote(a) for a in argv])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    progress = Progress(len(args.seeds) * args.requests)
    records, settings = [], {}
    for seed in args.seeds:
        recs, settings[str(seed)] = run_seed(seed, args, progress)
        records += recs
    first = settings[str(args.seeds[0])]
    results = {
        "command": command, "seeds": list(args.seeds), "requests": args.requests, "fraction": args.fraction,
        "smoke": bool(args.smoke), "recipe": RECIPE if not args.smoke else {"recipe": RECIPE, **SMOKE},
        "device": jax.default_backend(), "n_train": first["n_train"], "request_size": first["request_size"],
        "tolerances": {"auc": AUC_TOL, "test_acc_pts": ACC_TOL_PTS},
        "criteria_met": {k: int(sum(r[k] for r in records)) for k in CRITERIA},
        "diagnostics_met": {k: int(sum(r[k] for r in records)) for k in DIAGNOSTICS},
        "repeats": args.repeats,
        "original_slots_after_rewind": int(sum(len(r["original_slots_after_rewind"]) for r in records)),
        "settings": settings, "records": records, "wall_s": time.perf_counter() - t0,
        "machine": machine_info(), "library": library_version(),
    }
    text = table(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "table.md").write_text(text)
    log(f"done in {results['wall_s']:.0f}s -> {out}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
