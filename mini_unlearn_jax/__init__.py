"""mini-unlearn-jax: machine unlearning with minimal gradient snapshots, in JAX.

The functional API: build an :class:`Objective` (``make_objective``), train with :class:`Trainer`
(which threads a :class:`SnapshotState` buffer through the loop), save curvature statistics
with :func:`fit_stats`, and remove examples with :func:`unlearn` / :func:`unlearn_many`.

Layout: ``core`` (pure JAX: models, snapshots, training, linalg, the solvers and the method
registry), ``evaluation`` (metrics, attacks, privacy) and ``app`` (CLI, checkpoints, data,
harness, recipes). The evaluation and application names below load on first use, so
``import mini_unlearn_jax`` stays light; the modules' old flat paths (``mini_unlearn_jax.mini``,
``mini_unlearn_jax.curvature``, ...) still import.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from .core.certificate import Certificate, certify, certify_removal
from .core.linalg import EKFAC, fit_stats
from .core.methods import (
    METHODS,
    Method,
    MethodOutput,
    Problem,
    applicable,
    get_method,
    register_method,
    run_method,
)
from .core.mini import (
    MiniConfig,
    UnlearnError,
    UnlearnResult,
    pad_request,
    unlearn,
    unlearn_core,
    unlearn_many,
)
from .core.models import (
    MLP,
    LogisticRegression,
    Objective,
    build_model,
    init_params,
    make_objective,
)
from .core.snapshots import SnapshotBuffer, SnapshotState, data_grad_fn, snapshot_buffer
from .core.training import TrainConfig, Trainer, TrainState, default_config, train

# name -> module that defines it, imported when the name is first read (PEP 562)
_LAZY = {
    "attacks": "evaluation.attacks", "privacy": "evaluation.privacy",
    "agreement": "evaluation.metrics", "mean_kl": "evaluation.metrics",
    "predict_probs": "evaluation.metrics", "rel_param_error": "evaluation.metrics",
    "Run": "app.checkpoint", "load_run": "app.checkpoint", "save_run": "app.checkpoint",
    "DataError": "app.data", "Dataset": "app.data", "load_dataset": "app.data",
}

# the flat module paths of releases before the layered layout
_MOVED = {
    "models": "core.models", "snapshots": "core.snapshots", "training": "core.training",
    "curvature": "core.linalg", "mini": "core.mini", "deltagrad": "core.deltagrad",
    "trajectory": "core.trajectory", "certificate": "core.certificate", "methods": "core.methods",
    "metrics": "evaluation.metrics", "attacks": "evaluation.attacks", "privacy": "evaluation.privacy",
    "cli": "app.cli", "checkpoint": "app.checkpoint", "harness": "app.harness", "data": "app.data",
    "runtime": "app.runtime",
}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        value = module if _LAZY[name].endswith("." + name) else getattr(module, name)
        globals()[name] = value
        return value
    if name in _MOVED or name in ("app", "evaluation"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import mini_unlearn_jax.mini`` gives the module now at ``mini_unlearn_jax.core.mini``
    (the same module object, so its classes and functions are the same ones)."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, short = fullname.rpartition(".")
        if prefix == __name__ and short in _MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        target = importlib.import_module(f"{__name__}.{_MOVED[module.__name__.rpartition('.')[2]]}")
        sys.modules[module.__name__] = target  # the import statement returns sys.modules' entry


if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
    sys.meta_path.append(_OldPaths())

__all__ = [
    "attacks", "privacy",
    "Run", "load_run", "save_run",
    "Certificate", "certify", "certify_removal",
    "EKFAC", "fit_stats",
    "DataError", "Dataset", "load_dataset",
    "METHODS", "Method", "MethodOutput", "Problem", "applicable", "get_method", "register_method", "run_method",
    "agreement", "mean_kl", "predict_probs", "rel_param_error",
    "MLP", "LogisticRegression", "Objective", "build_model", "init_params", "make_objective",
    "SnapshotBuffer", "SnapshotState", "data_grad_fn", "snapshot_buffer",
    "TrainConfig", "Trainer", "TrainState", "default_config", "train",
    "MiniConfig", "UnlearnError", "UnlearnResult", "pad_request", "unlearn", "unlearn_core", "unlearn_many",
]
__version__ = "0.1.0"
