"""The unlearning baselines a neural-network result is compared against, as registered methods.

Each is a compact re-implementation of its paper's update on the same footing as trajectory
unlearning (`core/trajectory.py`): the recipe's mini-batch size, mini-batches drawn over the kept
(or removed) rows by `trajectory.keep_batches`, the recipe's optimizer at a constant learning
rate (`trajectory.phase_optimizer`: Adam for the built-in recipes, the user's optax optimizer
otherwise; `lr` defaults to the recipe's), and by default the same number of steps as trajectory
unlearning's retraining phase (`TrajectoryConfig().budget` times the recipe's steps), so that
every method runs at about the same cost. Each program is compiled ahead of time and its run
timed apart from compilation. Every method returns the trained model unchanged, with
`converged=False`, when its update produces NaN/inf.

With `w*` the trained model, `R` the remaining data and `F` the removed examples:

- `finetune`: minimise the recipe's loss on `R` from `w*` (catastrophic forgetting of `F`).
  On a full-batch recipe (the convex models): 10 steps of the recipe itself.
- `neggrad`: gradient ascent on the loss of `F` from `w*` (full batch over `F`, SGD).
- `neggrad-plus` (NegGrad+, Kurmanji et al. 2023): minimise
  `alpha * L_R(batch) - (1 - alpha) * L_F(batch)`: ascent on `F` held back by descent on `R`.
- `l1-sparse` (Jia et al. 2023): fine-tuning on `R` with an l1 penalty `gamma_t ||w||_1` whose
  weight decays linearly to 0 over the run (`gamma_t = gamma (1 - t / steps)`): sparsity pushes
  the model away from the weights that encode single examples.
- `salun` (Fan et al. 2024): a saliency mask, the entries of `|grad L_F(w*)|` above their
  `sparsity` quantile; then minimise `L_F(random other labels) + L_R` updating only the salient
  entries.
- `scrub` (Kurmanji et al. 2023): student and teacher start at `w*`; each iteration (during
  the first `max_steps`) one step maximising `KL(teacher || student)` on a batch of `F`, then one
  step minimising `KL + gamma * CE` on a batch of `R`.
- `from-init`: the compute-matched retrain: the recipe's optimizer from the initialisation on
  `R` for the same number of steps.

`docs/method.md` lists them with what each costs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .aot import aot, finite, timed
from .models import Objective
from .problem import MethodOutput, Problem, keep_mask
from .registry import needs_params0, register_method
from .training import TrainConfig, Trainer
from .trajectory import TrajectoryConfig, keep_batches, phase_optimizer, retrain_phase

Params = Any


def needs_minibatch_recipe(problem: Problem) -> str | None:
    """Why a mini-batch baseline does not apply: it trains with the recipe's mini-batch optimizer."""
    cfg = problem.recipe
    if cfg is None or cfg.batch_size is None or cfg.optimizer == "lbfgs":
        return ("it trains with the recipe's mini-batch optimizer, so the recipe must be a mini-batch "
                "TrainConfig (adam, sgd or your own optax optimizer, with batch_size and steps)")
    return None


def default_steps(cfg: TrainConfig) -> int:
    """The matched budget: as many steps as trajectory unlearning's retraining phase."""
    return max(1, int(round(TrajectoryConfig().budget * cfg.steps)))


def _finish(problem: Problem, out: Params, t: float, c: float, label: str, info: dict) -> MethodOutput:
    ok = finite(out)
    return MethodOutput(out if ok else problem.params, ok, f"{label}: {info['steps']} steps" if ok else f"{label} diverged",
                        t, c, info)


def _run(problem: Problem, program, static: tuple, dyn: tuple, label: str, info: dict) -> MethodOutput:
    compiled, c = aot(program, static, dyn)
    out, t = timed(compiled, *dyn)
    return _finish(problem, out, t, c, label, info)


def _keep(problem: Problem, forget) -> jax.Array:
    return jnp.asarray(keep_mask(int(problem.x.shape[0]), forget))


# -- fine-tuning and training from the initialisation ---------------------------------------


@functools.partial(jax.jit, static_argnames=("objective", "cfg", "steps", "lr"))
def _descend(objective: Objective, cfg: TrainConfig, steps: int, lr: float, params, x, y, keep, key):
    return retrain_phase(objective, params, x, y, keep, key, steps=steps, batch_size=cfg.batch_size,
                         optimizer=phase_optimizer(cfg, lr))


@functools.partial(jax.jit, static_argnames=("objective", "cfg", "steps"))
def _recipe_steps(objective: Objective, cfg: TrainConfig, steps: int, params, x, y, keep):
    trainer = Trainer(objective, dataclasses.replace(cfg, steps=steps, snapshots=1))
    return trainer._chunk(trainer.init(params), x, y, keep, length=steps).params


def _descend_from(problem: Problem, forget, start: Params, label: str, steps, lr, seed: int) -> MethodOutput:
    cfg = problem.train_config
    steps = default_steps(cfg) if steps is None else int(steps)
    lr = float(cfg.learning_rate if lr is None else lr)
    dyn = (start, problem.x, problem.y, _keep(problem, forget), jax.random.key(seed + 1))
    return _run(problem, _descend, (problem.objective, cfg, steps, lr), dyn, label, {"steps": steps, "lr": lr})


def run_finetune(problem: Problem, forget, *, steps: int | None = None, lr: float | None = None,
                 seed: int = 0) -> MethodOutput:
    """Fine-tuning on the remaining data from `w*`: `steps` mini-batch steps of the recipe's
    optimizer at `lr` (default the matched budget and the recipe's learning rate); on a
    full-batch recipe, `steps` (default 10) steps of the recipe itself."""
    cfg = problem.train_config
    if cfg.batch_size is not None and cfg.optimizer != "lbfgs":
        return _descend_from(problem, forget, problem.params, "finetune", steps, lr, seed)
    if lr is not None:
        raise ValueError("finetune on a full-batch recipe runs the recipe itself; its learning rate is the recipe's")
    steps = 10 if steps is None else int(steps)
    dyn = (problem.params, problem.x, problem.y, _keep(problem, forget))
    return _run(problem, _recipe_steps, (problem.objective, cfg, steps), dyn, "finetune", {"steps": steps})


def run_from_init(problem: Problem, forget, *, steps: int | None = None, lr: float | None = None,
                  seed: int = 0) -> MethodOutput:
    """Retraining from the initialisation `params0` at a matched budget: `steps` mini-batch steps
    of the recipe's optimizer at `lr` on the remaining data."""
    return _descend_from(problem, forget, problem.params0, "from init", steps, lr, seed)


# -- gradient ascent and NegGrad+ -----------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("objective", "steps", "lr"))
def _ascend(objective: Objective, steps: int, lr: float, params, xf, yf):
    opt = optax.sgd(lr)
    fn = lambda p: -objective.data_loss(p, xf, yf) + objective.penalty(p)

    def body(c, _):
        p, s = c
        u, s = opt.update(jax.grad(fn)(p), s, p)
        return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=steps)
    return p


def run_neggrad(problem: Problem, forget, *, steps: int = 5, lr: float = 0.05) -> MethodOutput:
    """Gradient ascent on the removed examples' mean loss: `steps` full-batch SGD steps at `lr`."""
    forget = np.asarray(forget)
    dyn = (problem.params, problem.x[forget], problem.y[forget])
    return _run(problem, _ascend, (problem.objective, int(steps), float(lr)), dyn, "gradient ascent",
                {"steps": int(steps), "lr": float(lr)})


@functools.partial(jax.jit, static_argnames=("objective", "cfg", "steps", "lr", "alpha"))
def _neggrad_plus(objective: Objective, cfg: TrainConfig, steps: int, lr: float, alpha: float, params, x, y,
                  keep, key):
    opt = phase_optimizer(cfg, lr)
    kr, kf = jax.random.split(key)
    idx_r = keep_batches(kr, keep, steps, cfg.batch_size)
    idx_f = keep_batches(kf, 1.0 - keep, steps, cfg.batch_size)

    def loss(q, br, bf):
        return (alpha * objective.data_loss(q, x[br], y[br]) - (1.0 - alpha) * objective.data_loss(q, x[bf], y[bf])
                + objective.penalty(q))

    def body(c, b):
        p, s = c
        u, s = opt.update(jax.grad(loss)(p, *b), s, p)
        return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), (idx_r, idx_f))
    return p


def run_neggrad_plus(problem: Problem, forget, *, steps: int | None = None, lr: float | None = None,
                     alpha: float = 0.99, seed: int = 0) -> MethodOutput:
    """NegGrad+: `steps` steps on `alpha * L_R - (1 - alpha) * L_F`, one batch of each per step."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"neggrad-plus: alpha weighs the remaining loss against the removed one and must lie "
                         f"in (0, 1), got {alpha}")
    cfg = problem.train_config
    steps = default_steps(cfg) if steps is None else int(steps)
    lr = float(cfg.learning_rate if lr is None else lr)
    dyn = (problem.params, problem.x, problem.y, _keep(problem, forget), jax.random.key(seed + 4))
    return _run(problem, _neggrad_plus, (problem.objective, cfg, steps, lr, float(alpha)), dyn, "neggrad-plus",
                {"steps": steps, "lr": lr, "alpha": float(alpha)})


# -- l1-sparse fine-tuning ------------------------------------------------------------------


def l1_norm(params: Params) -> jax.Array:
    """`sum |w|` over every parameter."""
    return sum(jnp.sum(jnp.abs(a)) for a in jax.tree.leaves(params))


@functools.partial(jax.jit, static_argnames=("objective", "cfg", "steps", "lr", "gamma"))
def _l1_sparse(objective: Objective, cfg: TrainConfig, steps: int, lr: float, gamma: float, params, x, y, keep,
               key):
    opt = phase_optimizer(cfg, lr)
    idx = keep_batches(key, keep, steps, cfg.batch_size)

    def loss(q, t, b):
        weight = gamma * (1.0 - t / steps)
        return objective.data_loss(q, x[b], y[b]) + objective.penalty(q) + weight * l1_norm(q)

    def body(c, tb):
        p, s = c
        u, s = opt.update(jax.grad(loss)(p, *tb), s, p)
        return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), (jnp.arange(steps), idx))
    return p


def run_l1_sparse(problem: Problem, forget, *, steps: int | None = None, lr: float | None = None,
                  gamma: float = 5e-4, seed: int = 0) -> MethodOutput:
    """l1-sparse: fine-tuning on the remaining data with the l1 weight `gamma`, decayed linearly."""
    if gamma < 0:
        raise ValueError(f"l1-sparse: gamma is the l1 penalty's weight and must be >= 0, got {gamma}")
    cfg = problem.train_config
    steps = default_steps(cfg) if steps is None else int(steps)
    lr = float(cfg.learning_rate if lr is None else lr)
    dyn = (problem.params, problem.x, problem.y, _keep(problem, forget), jax.random.key(seed + 5))
    return _run(problem, _l1_sparse, (problem.objective, cfg, steps, lr, float(gamma)), dyn, "l1-sparse",
                {"steps": steps, "lr": lr, "gamma": float(gamma)})


# -- SCRUB ----------------------------------------------------------------------------------


def _kl_teacher_student(zt, zs):
    pt = jax.nn.softmax(zt)
    return jnp.mean(jnp.sum(pt * (jax.nn.log_softmax(zt) - jax.nn.log_softmax(zs)), -1))


@functools.partial(jax.jit, static_argnames=("objective", "cfg", "steps", "max_steps", "lr", "gamma"))
def _scrub(objective: Objective, cfg: TrainConfig, steps: int, max_steps: int, lr: float, gamma: float,
           params, x, y, keep, key):
    opt = phase_optimizer(cfg, lr)
    kr, kf = jax.random.split(key)
    idx_r = keep_batches(kr, keep, steps, cfg.batch_size)
    idx_f = keep_batches(kf, 1.0 - keep, steps, cfg.batch_size)
    teacher = params

    def body(c, ti):
        p, s = c
        t, br, bf = ti
        zt_f = objective.logits(teacher, x[bf])
        gmax = jax.grad(lambda q: -_kl_teacher_student(zt_f, objective.logits(q, x[bf])))(p)
        u, s2 = opt.update(gmax, s, p)
        p, s = jax.tree.map(lambda a, b: jnp.where(t < max_steps, a, b), (optax.apply_updates(p, u), s2), (p, s))
        zt_r = objective.logits(teacher, x[br])

        def lmin(q):
            zs = objective.logits(q, x[br])
            ce = jnp.mean(jax.vmap(objective.example_loss)(zs, y[br]))
            return _kl_teacher_student(zt_r, zs) + gamma * ce + objective.penalty(q)

        u, s = opt.update(jax.grad(lmin)(p), s, p)
        return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), (jnp.arange(steps), idx_r, idx_f))
    return p


def run_scrub(problem: Problem, forget, *, steps: int | None = None, max_steps: int | None = None,
              lr: float | None = None, gamma: float = 1.0, seed: int = 0) -> MethodOutput:
    """SCRUB: `steps` min-steps, the first `max_steps` (default 0.4 of them) each preceded by a
    max-step on a batch of the removed examples."""
    cfg = problem.train_config
    steps = default_steps(cfg) if steps is None else int(steps)
    max_steps = int(round(0.4 * steps)) if max_steps is None else int(max_steps)
    lr = float(cfg.learning_rate if lr is None else lr)
    dyn = (problem.params, problem.x, problem.y, _keep(problem, forget), jax.random.key(seed + 2))
    return _run(problem, _scrub, (problem.objective, cfg, steps, max_steps, lr, float(gamma)), dyn, "scrub",
                {"steps": steps, "max_steps": max_steps, "lr": lr, "gamma": float(gamma)})


# -- SalUn ----------------------------------------------------------------------------------


def saliency_mask(objective: Objective, params: Params, x_forget, y_forget, sparsity: float) -> Params:
    """1 where `|grad L_F(params)|` (the removed rows' mean loss) is at or above its `sparsity`
    quantile over all weights, else 0."""
    g = jax.grad(lambda p: objective.data_loss(p, x_forget, y_forget))(params)
    flat = jnp.concatenate([jnp.abs(a).ravel() for a in jax.tree.leaves(g)])
    thr = jnp.quantile(flat, sparsity)
    return jax.tree.map(lambda a: (jnp.abs(a) >= thr).astype(a.dtype), g)


@functools.partial(jax.jit, static_argnames=("objective", "cfg", "steps", "lr", "sparsity", "num_classes"))
def _salun(objective: Objective, cfg: TrainConfig, steps: int, lr: float, sparsity: float, num_classes: int,
           params, x, y, keep, x_forget, y_forget, key):
    forget_w = 1.0 - keep
    mask = saliency_mask(objective, params, x_forget, y_forget, sparsity)
    opt = phase_optimizer(cfg, lr)
    kr, kf, kl = jax.random.split(key, 3)
    idx_r = keep_batches(kr, keep, steps, cfg.batch_size)
    idx_f = keep_batches(kf, forget_w, steps, cfg.batch_size)

    def body(c, ti):
        p, s = c
        t, br, bf = ti
        y_random = (y[bf] + jax.random.randint(jax.random.fold_in(kl, t), bf.shape, 1, num_classes)) % num_classes

        def loss(q):
            return objective.data_loss(q, x[bf], y_random) + objective.data_loss(q, x[br], y[br]) + objective.penalty(q)

        u, s = opt.update(jax.tree.map(jnp.multiply, jax.grad(loss)(p), mask), s, p)
        return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), (jnp.arange(steps), idx_r, idx_f))
    return p


def run_salun(problem: Problem, forget, *, steps: int | None = None, lr: float | None = None,
              sparsity: float = 0.5, seed: int = 0) -> MethodOutput:
    """SalUn: random-label fine-tuning restricted to the salient `1 - sparsity` of the weights.

    With an optimizer whose update is not zero where the gradient is (weight decay, momentum
    carried over), the unsalient weights still move; with the built-in Adam they stay put."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"salun: sparsity is the quantile of the saliency below which weights are frozen and must "
                         f"lie in [0, 1), got {sparsity}")
    cfg = problem.train_config
    steps = default_steps(cfg) if steps is None else int(steps)
    lr = float(cfg.learning_rate if lr is None else lr)
    num_classes = int(problem.objective.logits(problem.params, problem.x[:1]).shape[-1])
    forget = np.asarray(forget)
    dyn = (problem.params, problem.x, problem.y, _keep(problem, forget), problem.x[forget], problem.y[forget],
           jax.random.key(seed + 3))
    return _run(problem, _salun, (problem.objective, cfg, steps, lr, float(sparsity), num_classes), dyn, "salun",
                {"steps": steps, "lr": lr, "sparsity": float(sparsity)})


# -- registration ---------------------------------------------------------------------------


def _needs_finetune(problem: Problem) -> str | None:
    if problem.recipe is None:
        return ("it continues training with the recipe's optimizer, so it needs Problem.train_config to be a "
                "TrainConfig; this problem's recipe is a function")
    return None


def _needs_from_init(problem: Problem) -> str | None:
    return needs_minibatch_recipe(problem) or needs_params0(problem)


_MATCHED = "the matched budget: as many mini-batch steps as trajectory unlearning's retraining phase"
register_method("finetune", run_finetune, needs=_needs_finetune, family="any",
                cost=f"{_MATCHED}, on the remaining data (10 recipe steps on a full-batch recipe)",
                summary="fine-tuning on the remaining data from the trained model")
register_method("neggrad", run_neggrad, family="any", cost="5 full-batch steps over the removed examples",
                summary="gradient ascent on the removed examples' loss")
register_method("neggrad-plus", run_neggrad_plus, needs=needs_minibatch_recipe, family="network",
                cost=f"{_MATCHED}, each on a batch of remaining and a batch of removed examples",
                paper="Kurmanji et al. 2023 (NegGrad+)",
                summary="NegGrad+: descent on the remaining loss against ascent on the removed loss")
register_method("l1-sparse", run_l1_sparse, needs=needs_minibatch_recipe, family="network",
                cost=f"{_MATCHED}, on the remaining data", paper="Jia et al. 2023",
                summary="fine-tuning on the remaining data with a decaying l1 penalty")
register_method("salun", run_salun, needs=needs_minibatch_recipe, family="network",
                cost=f"one gradient over the removed examples, then {_MATCHED} (a batch of each kind per step)",
                paper="Fan et al. 2024", summary="SalUn: random-label fine-tuning of the salient weights only")
register_method("scrub", run_scrub, needs=needs_minibatch_recipe, family="network",
                cost=f"{_MATCHED}, 0.4 of them with an extra step on removed examples", paper="Kurmanji et al. 2023",
                summary="SCRUB: a student pushed away from its teacher on the removed examples, kept close on the rest")
register_method("from-init", run_from_init, needs=_needs_from_init, family="network",
                cost=f"{_MATCHED}, on the remaining data",
                summary="retraining from the initialisation at the matched budget")
