"""The registry of unlearning methods: the one list the CLI, the harness, the experiments and the
docs read.

A method is one `register_method` call with a typed entry (`Method`): how it runs
(``run(problem, forget, **options) -> MethodOutput``), what it needs of a
`Problem` (a trajectory, curvature statistics, a convex
objective), which models it is for, what one call reads, and the paper it comes from. The
built-in methods register themselves in their own modules (`core/methods.py`: Mini-Unlearning,
retraining, Newton, DeltaGrad and trajectory unlearning; `core/baselines.py`: the
neural-network baselines); importing `mini_unlearn_jax` registers them all.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

from .mini import validate_indices
from .problem import MethodOutput, Problem

FAMILIES = ("convex", "network", "any")


class Method(NamedTuple):
    """One registered method.

    Attributes:
      name: what `run_method` and `mini-unlearn unlearn --method` take.
      run: `run(problem, forget, **options) -> MethodOutput`; `forget` arrives validated (unique
        in-range integer indices).
      summary: one line for the CLI's help and the docs' methods table.
      needs: `needs(problem) -> str | None`: why the method does not apply to `problem` (None: it
        applies). `run_method` refuses with that reason instead of failing inside.
      family: the models it is meant for: `"convex"` (solvers for the remaining-data optimum),
        `"network"` (neural-network unlearning and its baselines) or `"any"`.
      cost: what one call reads and computes, in words (the docs' methods table).
      paper: where the method comes from (author, year), empty for the project's own.
      ground_truth: the method is the reference the others are compared against (`retrain`).
      own_reference: for a method that trains its own original model (DeltaGrad replays its own
        (S)GD run), `own_reference(problem, forget, **options) -> MethodOutput` is its ground
        truth: that recipe on the remaining data. The original it started from is
        `info["own_original"]` of its output. None: compared against the ground-truth method.
    """

    name: str
    run: Callable[..., MethodOutput]
    summary: str
    needs: Callable[[Problem], str | None] | None = None
    family: str = "any"
    cost: str = ""
    paper: str = ""
    ground_truth: bool = False
    own_reference: Callable[..., MethodOutput] | None = None


_REGISTRY: dict[str, Method] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


def register_method(name: str, run: Callable[..., MethodOutput] | None = None, *, summary: str,
                    needs: Callable[[Problem], str | None] | None = None, family: str = "any", cost: str = "",
                    paper: str = "", ground_truth: bool = False,
                    own_reference: Callable[..., MethodOutput] | None = None, replace: bool = False):
    """Register `run` as method `name` (usable as a decorator when `run` is omitted).

    The keyword arguments are the fields of `Method`. Registering a taken name raises
    unless `replace=True`. Returns `run`.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"method name {name!r}: use lower-case letters, digits, '-' and '_', starting with a letter")
    if not summary or not isinstance(summary, str):
        raise ValueError(f"method {name!r}: give a one-line summary (it is the CLI's help for the method)")
    if family not in FAMILIES:
        raise ValueError(f"method {name!r}: family must be one of {', '.join(FAMILIES)}, not {family!r}")
    if ground_truth and any(m.ground_truth for m in _REGISTRY.values() if m.name != name):
        raise ValueError(f"method {name!r}: {ground_truth_method()!r} is already the ground truth")

    def add(fn):
        if not callable(fn):
            raise TypeError(f"method {name!r}: run must be callable as run(problem, forget, **options)")
        if name in _REGISTRY and not replace:
            raise ValueError(f"method {name!r} is already registered; pass replace=True to replace it")
        _REGISTRY[name] = Method(name, fn, summary, needs, family, cost, paper, ground_truth, own_reference)
        return fn

    return add if run is None else add(run)


def unregister_method(name: str) -> None:
    """Remove a registered method (for plugins and tests)."""
    get_method(name)
    del _REGISTRY[name]


def get_method(name: str) -> Method:
    """The registered `Method` called `name`; ValueError naming the choices otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(_REGISTRY)}") from None


def run_method(name: str, problem: Problem, forget, **options) -> MethodOutput:
    """Run method `name` on `problem` removing training indices `forget` (refused, with the
    reason, where the method does not apply)."""
    method = get_method(name)
    why = method.needs(problem) if method.needs is not None else None
    if why:
        raise ValueError(f"method {name!r} does not apply to this problem: {why}")
    return method.run(problem, validate_indices(forget, int(problem.x.shape[0])), **options)


def ground_truth_method() -> str:
    """The name of the registered ground-truth method (`retrain`)."""
    for m in _REGISTRY.values():
        if m.ground_truth:
            return m.name
    raise LookupError("no ground-truth method is registered")


def applicable(name: str, problem: Problem) -> str | None:
    """Why method `name` does not apply to `problem`, or None when it does."""
    m = get_method(name)
    return m.needs(problem) if m.needs is not None else None


def methods_for(family: str) -> tuple[str, ...]:
    """The registered methods meant for `family` (`"convex"` or `"network"`), the methods of
    family `"any"` included, in registration order."""
    return tuple(m.name for m in _REGISTRY.values() if m.family in (family, "any"))


def needs_params0(problem: Problem) -> str | None:
    """Why a method that trains from the initial parameters does not apply."""
    if problem.params0 is None:
        return "it trains from the initial parameters, and Problem.params0 is None (save_run(params0=...) keeps them)"
    return None


def needs_all(*checks: Callable[[Problem], str | None]) -> Callable[[Problem], str | None]:
    """A `needs` function that gives the first reason any of `checks` gives."""
    def needs(problem: Problem) -> str | None:
        return next((why for why in (c(problem) for c in checks) if why), None)
    return needs


class _Names(Sequence):
    """The registered method names, in registration order (a live view of the registry)."""

    def __getitem__(self, i):
        return tuple(_REGISTRY)[i]

    def __len__(self):
        return len(_REGISTRY)

    def __contains__(self, name):
        return name in _REGISTRY

    def __repr__(self):
        return repr(tuple(_REGISTRY))


METHODS: Sequence[str] = _Names()


def describe() -> str:
    """`name: summary` of every registered method, one per line (the CLI's help)."""
    return "\n".join(f"{m.name}: {m.summary}" for m in _REGISTRY.values())
