"""One ahead-of-time compile cache for the whole package.

Methods report their run time without compilation (``MethodOutput.compile_s`` apart): a jitted
function is lowered and compiled once per static arguments and argument shapes, kept here, and
the compiled program is what gets timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_COMPILED: dict = {}
_MAX_ENTRIES = 256


def compiled(key, lower: Callable[[], Any]) -> tuple[Any, float]:
    """The executable cached under ``key``, or ``lower().compile()`` stored there; returns it
    with the seconds spent compiling (0 when it was cached)."""
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    t0 = time.perf_counter()
    exe = lower().compile()
    if len(_COMPILED) >= _MAX_ENTRIES:
        _COMPILED.clear()
    _COMPILED[key] = exe
    return exe, time.perf_counter() - t0


def clear_compiled() -> None:
    """Drop every cached executable, with JAX's own compilation caches (``jax.clear_caches``).

    A long-lived process that compiles for one model after another (the grid harness) calls this
    between models: each CPU executable keeps memory mappings of its own, and thousands of them
    exhaust the process's map count (LLVM: "Unable to allocate section memory")."""
    _COMPILED.clear()
    jax.clear_caches()


def signature(args) -> tuple:
    """Tree structure, shapes and dtypes of ``args`` (what a compiled program is specialised to)."""
    return jax.tree.structure(args), tuple((np.shape(a), str(getattr(a, "dtype", type(a))))
                                           for a in jax.tree.leaves(args))


def aot(fn_jit, static_args: tuple, dyn_args: tuple, static_kw: dict | None = None):
    """Compile ``fn_jit(*static_args, *dyn_args, **static_kw)`` ahead of time (static arguments
    first); returns (callable on ``dyn_args``, compile seconds -- 0 when already compiled)."""
    kw = static_kw or {}
    key = (fn_jit, static_args, tuple(sorted(kw.items())), signature(dyn_args))
    return compiled(key, lambda: fn_jit.lower(*static_args, *dyn_args, **kw))


def timed(exe, *args):
    """Run ``exe(*args)`` to completion; returns (output, seconds)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(exe(*args))
    return out, time.perf_counter() - t0


def finite(tree) -> bool:
    """Whether every leaf of ``tree`` is finite."""
    return bool(all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(tree)))


def steps_for_time(run: Callable[..., Any], budget_s: float, probes: tuple[int, int] = (40, 200)) -> int:
    """How many steps of ``run(steps=k)`` (returning something with ``time_s``, compilation apart)
    take ``budget_s`` seconds: ``time = overhead + steps * per_step`` fitted from two probe
    lengths (each compiled first, then the minimum of 3 timed runs). For compute-matched
    baselines: the steps a baseline gets in a method's measured time."""
    a, b = probes
    run(steps=a), run(steps=b)  # compile both
    ta = min(run(steps=a).time_s for _ in range(3))
    tb = min(run(steps=b).time_s for _ in range(3))
    per = max((tb - ta) / (b - a), 1e-9)
    return max(1, int((budget_s - max(ta - a * per, 0.0)) / per))
