"""The built-in unlearning methods for convex models, retraining, DeltaGrad and trajectory
unlearning, registered in the method registry (`core/registry.py`); the neural-network
baselines are in `core/baselines.py`. Also the refresh that readies a problem for the next
deletion request (`after_removal`).

Every method returns a `MethodOutput` whose `time_s` excludes compilation (reported apart in
`compile_s`): jitted methods are compiled ahead of time (`core/aot.py`), then the compiled
program is timed.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from . import deltagrad as dg
from . import linalg as cv
from . import mini as ul
from . import trajectory as tj
from .aot import aot, finite, timed
from .models import Objective
from .problem import MethodOutput, Problem, keep_mask
from .registry import needs_all, needs_params0, register_method
from .snapshots import log_schedule, snapshot_buffer, trajectory_buffer
from .training import TrainConfig, Trainer

Params = Any

MINI_VARIANTS = {
    "mini": ul.MiniConfig(),  # the defaults of MiniConfig are the `mini` method
    "mini-lite": ul.MiniConfig(refine_passes=0),
    "mini-plus": ul.MiniConfig(refine_passes=25),  # 24 CG steps (the default makes 12)
}


def _needs_recipe(what: str):
    def needs(problem: Problem) -> str | None:
        if problem.recipe is None:
            return (f"it {what}, so it needs Problem.train_config to be a TrainConfig; this problem's "
                    f"recipe is a function (give a TrainConfig)")
        return None
    return needs


def needs_convex(problem: Problem) -> str | None:
    """Why a convex-only solver (the fixed point, Newton) does not apply: the objective is not
    known to be convex. On a network its fixed point is (nearly) the trained model, which still
    remembers the removed examples, so running it would report a no-op as success."""
    if problem.objective.is_convex:
        return None
    return ("it solves for the remaining-data optimum, which is the retrained model only for a convex objective, "
            "and this objective is not known to be convex (on a network it returns nearly the trained model, which "
            "still remembers the removed examples). Keep a trajectory buffer while training (trajectory_buffer; "
            "`mini` then runs trajectory unlearning) or use retrain; if the objective is convex, declare it: "
            "make_objective(..., convex=True)")


def _needs_snapshots(problem: Problem) -> str | None:
    if problem.snapshots is None:
        return "it reads the snapshot buffer, and Problem.snapshots is None (thread a snapshot_buffer through training)"
    return None


# -- Mini-Unlearning ----------------------------------------------------------------------


def run_mini(problem: Problem, forget, config: ul.MiniConfig) -> MethodOutput:
    n = int(problem.x.shape[0])
    idx, mask = ul.pad_request(forget, n, config.min_bucket)
    kind = ul.resolve_curvature(problem.objective, config, problem.stats)
    dyn = (problem.params, problem.snapshots.params, problem.snapshots.grads, problem.snapshots.count,
           problem.stats, problem.x, problem.y, jnp.asarray(idx), jnp.asarray(mask))
    compiled, compile_s = aot(ul.solve_jit, (problem.objective, config, kind), dyn)
    res, t = timed(compiled, *dyn)
    info = {
        "curvature": res.curvature(),
        "status": res.status_name(),
        "iterations": int(res.iterations),
        "step_norm": float(res.step_norm),
        "contraction": float(res.contraction),  # the rate estimate; NaN before 2 step ratios exist
        "error_estimate": float(res.error_estimate),  # q/(1-q) * step: an estimate, not a bound
        "data_passes": int(res.stats.data_passes),
        "refine_passes": int(res.refine_passes),
        "fixed_point_residual": float(res.stats.fixed_point_residual),
        "refine_residual": float(res.refine_residual),
        "bucket": int(idx.size),
    }
    return MethodOutput(res.params, bool(res.converged), res.reason(), t, compile_s, info)


# -- retrain --------------------------------------------------------------------------------


def run_retrain(problem: Problem, forget, verbose: bool = False) -> MethodOutput:
    """Retrain from ``params0`` on the remaining data with the problem's recipe.

    With a :class:`TrainConfig`, compilation is timed apart; with a recipe function (your own
    loop) the whole call is timed, its compilation included (``info['compile_included']``)."""
    n = int(problem.x.shape[0])
    keep = keep_mask(n, forget)
    if problem.recipe is None:
        t0 = time.perf_counter()
        out = jax.block_until_ready(problem.train_config(problem.params0, problem.x, problem.y, jnp.asarray(keep)))
        ok = finite(out)
        return MethodOutput(out, ok, "converged" if ok else "retraining diverged", time.perf_counter() - t0, 0.0,
                            {"compile_included": True})
    cfg = problem.train_config
    # a run that keeps a trajectory gets the retrained model's own, on the recipe's schedule
    traj = problem.extras.get("trajectory")
    buf = None if traj is None else trajectory_buffer(log_schedule(cfg.steps, int(traj.state.steps.shape[0])))
    trainer = Trainer(problem.objective, cfg, trajectory=buf)
    t0 = time.perf_counter()
    state = trainer.fit(problem.params0, problem.x, problem.y, keep, verbose=verbose, label="retrain")
    jax.block_until_ready(state.params)
    wall = time.perf_counter() - t0
    ok = finite(state.params)
    return MethodOutput(state.params, ok, "converged" if ok else "retraining diverged", wall - trainer.compile_s,
                        trainer.compile_s, {"steps": int(state.step), "grad_norm": float(state.grad_norm)},
                        {"trajectory": state.trajectory} if buf is not None and ok else None)


# -- Newton-CG ------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("objective", "iters"))
def _newton(objective: Objective, iters: int, params, x, y, keep):
    fn = lambda p: objective.data_loss(p, x, y, keep) + objective.penalty(p)
    w0, unravel = ravel_pytree(params)
    g = ravel_pytree(jax.grad(fn)(params))[0]
    H = lambda v: ravel_pytree(cv.hvp(fn, params, unravel(v)))[0]
    d, _, _ = cv.pcg(H, -g, jnp.zeros_like(w0), lambda v: v, iters)
    return unravel(w0 + d)


def _objective_rose(problem: Problem, forget, start, result, factor: float = 1.0) -> tuple[bool, float, float]:
    """Whether the remaining-data objective at ``result`` exceeds ``factor`` x its value at ``start``."""
    keep = jnp.asarray(keep_mask(int(problem.x.shape[0]), forget))
    f_rem = jax.jit(lambda p: problem.objective.value(p, problem.x, problem.y, keep))
    before, after = float(f_rem(start)), float(f_rem(result))
    return not after <= factor * before + 1e-6, before, after


def run_newton(problem: Problem, forget, iters: int = 100) -> MethodOutput:
    keep = jnp.asarray(keep_mask(int(problem.x.shape[0]), forget))
    dyn = (problem.params, problem.x, problem.y, keep)
    compiled, c = aot(_newton, (problem.objective, iters), dyn)
    out, t = timed(compiled, *dyn)
    ok = finite(out)
    reason = "converged" if ok else "Newton step produced NaN/inf"
    if ok:
        rose, before, after = _objective_rose(problem, forget, problem.params, out)
        if rose:  # e.g. an indefinite Hessian of a non-convex model
            ok, reason = False, (f"the Newton step raised the remaining-data objective from {before:.4g} to "
                                 f"{after:.4g}; the original parameters are returned")
    return MethodOutput(out if ok else problem.params, ok, reason, t, c, {"cg_iters": iters})


# -- DeltaGrad -----------------------------------------------------------------------------


def stable_lr(problem: Problem, iters: int = 20) -> float:
    """``1 / L``, with ``L`` the largest eigenvalue of the objective's Gauss-Newton matrix at the
    trained parameters (power iteration) -- a step size for which gradient descent is stable."""
    obj = problem.objective
    w0, unravel = ravel_pytree(problem.params)
    ones = jnp.ones((problem.x.shape[0],), w0.dtype)
    mv = jax.jit(lambda v: ravel_pytree(cv.ggn_vp(obj, problem.params, problem.x, problem.y, ones, unravel(v)))[0])
    v0 = jax.random.normal(jax.random.key(0), w0.shape, w0.dtype)
    lmax = float(jax.jit(lambda v: cv.top_eigenvalue(mv, v, iters + 1))(v0))
    L = lmax + obj.l2
    return float(min(1.0, 1.0 / max(L, 1e-6)))


def deltagrad_config(problem: Problem, **options) -> dg.DeltaGradConfig:
    """DeltaGrad's (S)GD recipe for this problem: the recipe's batch size and seed, ``300`` steps
    (full batch) or the recipe's step count, and the step size ``1/L`` of :func:`stable_lr`
    unless given (DeltaGrad replays GD/SGD, not L-BFGS or Adam)."""
    cfg = problem.train_config
    base = {"steps": 300 if cfg.batch_size is None else cfg.steps, "batch_size": cfg.batch_size, "seed": cfg.seed}
    base.update(options)
    if "lr" not in base:
        base["lr"] = stable_lr(problem)
    return dg.DeltaGradConfig(**base)


def run_deltagrad(problem: Problem, forget, **options) -> MethodOutput:
    """DeltaGrad on its own (S)GD training trajectory from the same init.

    The trajectory and its cache are built first (training-time cost, reported as
    ``info['train_s']``); the replay is timed. ``info['own_original']`` is the (S)GD-trained
    model it starts from: DeltaGrad's ground truth is :func:`deltagrad_retrain`, the same (S)GD
    recipe on the remaining data.
    """
    cfg = deltagrad_config(problem, **options)
    t0 = time.perf_counter()
    w_dg, cache = dg.train_with_cache(problem.objective, cfg, problem.params0, problem.x, problem.y)
    jax.block_until_ready(w_dg)
    train_s = time.perf_counter() - t0
    remove = ~keep_mask(int(problem.x.shape[0]), forget).astype(bool)
    t0 = time.perf_counter()
    jax.block_until_ready(dg.deltagrad_unlearn(problem.objective, cfg, cache, problem.params0, problem.x, problem.y, remove)[0])
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out, info = dg.deltagrad_unlearn(problem.objective, cfg, cache, problem.params0, problem.x, problem.y, remove)
    jax.block_until_ready(out)
    t = time.perf_counter() - t0
    ok = info.finite and finite(out)
    reason = "converged" if ok else "DeltaGrad's replay diverged (NaN/inf)"
    if ok:
        # a replay that blew up without overflowing: the remaining-data objective must not rise
        # far above that of DeltaGrad's own trained model (retraining lowers or keeps it)
        rose, before, after = _objective_rose(problem, forget, w_dg, out, factor=1.5)
        if rose:
            ok = False
            reason = (f"DeltaGrad's replay diverged: the remaining-data objective rose from {before:.4g} "
                      f"(its trained model) to {after:.4g}; the trained model is returned")
    return MethodOutput(out if ok else w_dg, ok, reason,
                        t, max(first - t, 0.0),
                        {"exact_steps": info.exact_steps, "steps": info.steps, "cache_bytes": info.cache_nbytes,
                         "train_s": train_s, "own_original": w_dg, "config": dataclasses.asdict(cfg)})


def deltagrad_retrain(problem: Problem, forget, **options) -> MethodOutput:
    """Ground truth for DeltaGrad: its (S)GD recipe on the remaining data (compile timed apart);
    with nothing removed, DeltaGrad's own original model. ``info['train_config']`` is that recipe
    as a :class:`TrainConfig` (what a membership attack's shadow models imitate)."""
    cfg = deltagrad_config(problem, **options)
    keep = jnp.asarray(keep_mask(int(problem.x.shape[0]), forget))
    dyn = (problem.params0, problem.x, problem.y, keep)
    compiled, c = aot(dg.train_program, (problem.objective, cfg), dyn, {"record": False})
    (out, _), t = timed(compiled, *dyn)
    recipe = TrainConfig(optimizer="sgd", learning_rate=cfg.lr, steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed)
    return MethodOutput(out, finite(out), "converged", t, c, {"train_config": recipe})


# -- sequential requests --------------------------------------------------------------------


PROBE_SCALE = 1e-2  # probe step of the refreshed buffer, relative to ||w|| / sqrt(dim)


@functools.partial(jax.jit, static_argnames=("objective", "size", "every", "probes"))
def _refresh(objective: Objective, size: int, every: int, probes: bool, params, x, y):
    """A new snapshot buffer for ``params`` on the remaining data ``(x, y)``; nothing of the old.

    Its newest entry is ``(params, grad G_{D\\R}(params))``. With ``probes`` (models whose solver
    pairs entries, L-BFGS) the ``size - 1`` older slots hold probes along a seeded random path
    into ``params``, ``w_j = params - h (d_{j+1} + ... + d_{size-1})`` with ``d ~ N(0, I)`` and
    ``h = PROBE_SCALE ||params|| / sqrt(dim)``, each with its remaining-data gradient (one pass
    each): their secant pairs sample the remaining-data curvature at the new model. Without
    (the EKFAC path reads only the newest entry) the older slots stay empty."""
    grad = lambda p: jax.grad(objective.data_loss)(p, x, y)
    buf = snapshot_buffer(size, every)
    state = buf.init(params)
    if probes and size > 1:
        w, unravel = ravel_pytree(params)
        h = PROBE_SCALE * jnp.maximum(jnp.linalg.norm(w), 1.0) / jnp.sqrt(w.size)
        d = h * jax.random.normal(jax.random.key(0), (size - 1, w.size), w.dtype)
        tail = jnp.cumsum(d[::-1], axis=0)[::-1]  # row j: d_{j+1} + ... + d_{size-1}
        for j in range(size - 1):
            p_j = unravel(w - tail[j])
            state = buf.update(state, j * every, p_j, grad(p_j), force=True)
    return buf.update(state, (size - 1) * every, params, grad(params), force=True), cv.fit_stats(objective, params, x)


class Refresh(NamedTuple):
    """What :func:`refresh_for_next_request` returns: the next problem and what it cost."""

    problem: Problem
    time_s: float  # the passes over the remaining data (buffer, statistics, trajectory profile), compiled
    compile_s: float  # compiling them (0 when these shapes were compiled before in the process)


def refresh_for_next_request(problem: Problem, params, forget, buffers: dict | None = None) -> Refresh:
    """:func:`after_removal`, with its run time and compile time measured apart."""
    n = int(problem.x.shape[0])
    alive = np.flatnonzero(keep_mask(n, ul.validate_indices(forget, n)))
    x, y = problem.x[alive], problem.y[alive]
    cfg = problem.train_config
    snaps, stats, t, c = None, None, 0.0, 0.0
    if problem.snapshots is not None:
        size, every = int(problem.snapshots.steps.shape[0]), (cfg.snapshot_every if problem.recipe else 1)
        dyn = (params, x, y)
        compiled, c = aot(_refresh, (problem.objective, size, every, problem.stats is None), dyn)
        (snaps, stats), t = timed(compiled, *dyn)
    elif problem.stats is not None:
        stats = cv.fit_stats(problem.objective, params, x)
    extras = dict(problem.extras)
    if "trajectory" in extras:
        data = extras["trajectory"]
        rebuilt = (buffers or {}).get("trajectory")
        state = rebuilt if rebuilt is not None else tj.initial_only(data.state)
        dyn_t = (state, params, x, y, data.x_val, data.y_val)
        compiled_t, c_t = aot(tj.refresh_program, (problem.objective,), dyn_t)
        (state, profile), t_t = timed(compiled_t, *dyn_t)
        extras["trajectory"] = data._replace(state=state, profile=profile)
        t, c = t + t_t, c + c_t
    return Refresh(dataclasses.replace(problem, params=params, snapshots=snaps, stats=stats, x=x, y=y, extras=extras),
                   t, c)


def after_removal(problem: Problem, params, forget, buffers: dict | None = None) -> Problem:
    """The problem for the next deletion request, holding nothing computed over the removed
    examples: the remaining data, ``params`` as the new trained model, a new snapshot buffer
    built at ``params`` on the remaining data (:func:`_refresh`: its newest entry, plus, for
    models whose solver pairs entries, probes around it), curvature statistics refitted there,
    and, for a run that keeps a trajectory, the trajectory the method rebuilt (``buffers``, from
    :class:`MethodOutput`) or, if it rebuilt none, only the initialisation
    (:func:`~mini_unlearn_jax.core.trajectory.initial_only`), with its profile on the remaining
    data. The CLI reports the time of these passes as ``refresh_s`` and counts it in ``time_ratio``."""
    return refresh_for_next_request(problem, params, forget, buffers).problem


# -- the built-in methods -------------------------------------------------------------------


def _mini_variant(name: str):
    def run(problem: Problem, forget, **options) -> MethodOutput:
        cfg = MINI_VARIANTS[name]
        out = run_mini(problem, forget, dataclasses.replace(cfg, **options) if options else cfg)
        return out._replace(info={**out.info, "solver": "fixed-point"})
    return run


_run_fixed_point_mini = _mini_variant("mini")


def _run_default_mini(problem: Problem, forget, **options) -> MethodOutput:
    """``mini``: trajectory unlearning where the problem carries a trajectory buffer (the CLI's
    MLP runs: non-convex training, where the fixed point reproduces the trained model), else the
    contraction-mapping fixed point (logistic regression and other convex objectives)."""
    if "trajectory" in problem.extras and tj.needs_trajectory(problem) is None:
        return tj.run_from_problem(problem, forget, **options)
    return _run_fixed_point_mini(problem, forget, **options)


def _needs_mini(problem: Problem) -> str | None:
    if "trajectory" in problem.extras and tj.needs_trajectory(problem) is None:
        return None
    return _needs_fixed_point(problem)


_needs_fixed_point = needs_all(needs_convex, _needs_snapshots)


_FIXED_POINT_COST = "the removed examples, the snapshot buffer and the curvature statistics"
register_method("mini", _run_default_mini, needs=_needs_mini, family="any", paper="Huang et al. 2024",
                cost=f"convex: {_FIXED_POINT_COST}, and a few passes of refinement over the remaining data; "
                     "network: the trajectory method's cost",
                summary="Mini-Unlearning, the default: the fixed point with refinement (convex models), or "
                        "trajectory unlearning where the run kept a trajectory buffer (networks)")
register_method("mini-lite", _mini_variant("mini-lite"), needs=_needs_fixed_point, family="convex",
                paper="Huang et al. 2024", cost=f"{_FIXED_POINT_COST}; no pass over the remaining data",
                summary="Mini-Unlearning without any pass over the remaining data")
register_method("mini-plus", _mini_variant("mini-plus"), needs=_needs_fixed_point, family="convex",
                paper="Huang et al. 2024", cost=f"{_FIXED_POINT_COST}, and 25 passes of refinement",
                summary="Mini-Unlearning with more refinement (24 CG steps)")
register_method("retrain", run_retrain, ground_truth=True, needs=needs_params0, family="any",
                cost="the whole training recipe on the remaining data",
                summary="ground truth: the training recipe rerun on the remaining data")
register_method("newton", run_newton, needs=needs_convex, family="convex",
                cost="a gradient and 100 Hessian-vector products over the remaining data",
                summary="Newton-CG on the remaining data with exact Hessian-vector products")
register_method("deltagrad", run_deltagrad, own_reference=deltagrad_retrain, family="convex",
                needs=needs_all(_needs_recipe("replays the recipe's mini-batch schedule"), needs_params0),
                paper="Wu et al. 2020", cost="its own (S)GD run replayed, exact gradients every few steps",
                summary="DeltaGrad on its own (S)GD trajectory; sound only for small removals")
register_method("trajectory", tj.run_from_problem, needs=tj.needs_trajectory, family="network",
                cost="forward passes over the trajectory buffer and a short retraining phase (0.15 of the recipe)",
                summary="trajectory unlearning: rewind along the trajectory buffer, short one-cycle retrain, "
                        "temperature calibration (what mini runs on networks)")

from . import baselines as _baselines  # noqa: E402,F401  (registers the neural-network baselines after these)
from . import quadratic as _quadratic  # noqa: E402,F401  (registers mini-exact, the stored quadratic model)
