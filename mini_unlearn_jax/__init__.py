"""mini-unlearn-jax: remove training examples from a trained JAX model far faster than retraining.

Train your model (with :class:`Trainer`, or your own optax loop threading the pure buffers
:func:`snapshot_buffer` and :func:`trajectory_buffer`), gather what training produced with
:func:`make_problem`, and call :func:`unlearn`: trajectory unlearning for a network that kept
a trajectory buffer, the contraction-mapping fixed point for a convex objective, a clear error
otherwise. :func:`after_removal` readies the next request. The names are grouped below by task;
the evaluation and checkpoint names load on first use, so ``import mini_unlearn_jax`` stays light.
"""

import importlib

from .core import methods as _builtin_methods  # noqa: F401  (registers the built-in methods)

# the public names, grouped by task in __all__ below
from .core.adapters import Model, as_model, find_head, update_module
from .core.certificate import Certificate, certify, certify_removal
from .core.linalg import EKFAC, fit_stats
from .core.mini import (
    MiniConfig,
    fixed_point_unlearn,
    fixed_point_unlearn_many,
    pad_request,
    unlearn_core,
)
from .core.mini_result import UnlearnError, UnlearnResult
from .core.models import (
    MLP,
    LogisticRegression,
    Objective,
    PatchConv,
    ResidualCNN,
    build_model,
    check_param_dtypes,
    init_params,
    make_objective,
)
from .core.problem import MethodOutput, Problem
from .core.registry import (
    METHODS,
    Method,
    applicable,
    get_method,
    methods_for,
    register_method,
    run_method,
    unregister_method,
)
from .core.snapshots import (
    SnapshotBuffer,
    SnapshotState,
    TrajectoryBuffer,
    TrajectoryState,
    data_grad_fn,
    log_schedule,
    snapshot_buffer,
    trajectory_buffer,
)
from .core.training import TrainConfig, Trainer, TrainState, default_config, train
from .core.trajectory import TrajectoryConfig
from .core.unlearning import (
    Unlearned,
    UnlearnedBatch,
    after_removal,
    choose_method,
    make_problem,
    unlearn,
)

# name -> module that defines it, imported when the name is first read (PEP 562)
_LAZY = {
    # evaluation
    "attacks": "evaluation.attacks", "lira": "evaluation.lira", "privacy": "evaluation.privacy",
    "agreement": "evaluation.metrics", "mean_kl": "evaluation.metrics",
    "predict_probs": "evaluation.metrics", "rel_param_error": "evaluation.metrics",
    "AuditReport": "evaluation.audit", "audit_params": "evaluation.audit",
    "evaluate": "evaluation.compare", "compare": "evaluation.compare",
    # checkpoints and data
    "Run": "app.checkpoint", "load_run": "app.checkpoint", "save_run": "app.checkpoint",
    "save_problem": "app.checkpoint",
    "audit_run": "app.audit", "retire_run": "app.retire",
    "DataError": "app.data", "Dataset": "app.data", "load_dataset": "app.data",
}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        value = module if _LAZY[name].endswith("." + name) else getattr(module, name)
        globals()[name] = value
        return value
    if name in ("core", "app", "evaluation"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    # models and objectives
    "Model", "as_model", "find_head", "update_module", "Objective", "make_objective", "check_param_dtypes", "LogisticRegression", "MLP", "ResidualCNN", "PatchConv",
    "build_model", "init_params",
    # training
    "TrainConfig", "Trainer", "TrainState", "default_config", "train",
    "SnapshotBuffer", "SnapshotState", "snapshot_buffer", "data_grad_fn",
    "TrajectoryBuffer", "TrajectoryState", "trajectory_buffer", "log_schedule",
    "EKFAC", "fit_stats",
    # unlearning
    "Problem", "make_problem", "unlearn", "choose_method", "Unlearned", "UnlearnedBatch", "after_removal",
    "UnlearnError",
    # methods
    "METHODS", "Method", "MethodOutput", "applicable", "get_method", "methods_for", "register_method",
    "unregister_method", "run_method",
    "TrajectoryConfig", "MiniConfig", "UnlearnResult", "fixed_point_unlearn", "fixed_point_unlearn_many",
    "unlearn_core", "pad_request", "Certificate", "certify", "certify_removal",
    # evaluation
    "attacks", "lira", "privacy", "agreement", "mean_kl", "predict_probs", "rel_param_error", "AuditReport", "audit_params",
    "evaluate", "compare",
    # checkpoints, data, deletion
    "Run", "load_run", "save_run", "save_problem", "audit_run", "retire_run", "DataError", "Dataset", "load_dataset",
]
__version__ = "0.1.0"
