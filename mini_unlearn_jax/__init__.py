"""mini-unlearn-jax: machine unlearning with minimal gradient snapshots, in JAX.

The functional API: build an :class:`Objective` (``make_objective``), train with :class:`Trainer`
(which threads a :class:`SnapshotState` buffer through the loop), save curvature statistics
with :func:`fit_stats`, and remove examples with :func:`unlearn` / :func:`unlearn_many`.
"""

from . import attacks, privacy
from .certificate import Certificate, certify, certify_removal
from .checkpoint import Run, load_run
from .curvature import EKFAC, fit_stats
from .data import DataError, Dataset, load_dataset
from .methods import METHODS, MethodOutput, Problem, run_method
from .metrics import agreement, mean_kl, predict_probs, rel_param_error
from .mini import (
    MiniConfig,
    UnlearnError,
    UnlearnResult,
    pad_request,
    unlearn,
    unlearn_core,
    unlearn_many,
)
from .models import MLP, LogisticRegression, Objective, build_model, init_params, make_objective
from .snapshots import SnapshotBuffer, SnapshotState, snapshot_buffer
from .training import TrainConfig, Trainer, TrainState, default_config, train

__all__ = [
    "attacks", "privacy",
    "Run", "load_run",
    "Certificate", "certify", "certify_removal",
    "EKFAC", "fit_stats",
    "DataError", "Dataset", "load_dataset",
    "METHODS", "MethodOutput", "Problem", "run_method",
    "agreement", "mean_kl", "predict_probs", "rel_param_error",
    "MLP", "LogisticRegression", "Objective", "build_model", "init_params", "make_objective",
    "SnapshotBuffer", "SnapshotState", "snapshot_buffer",
    "TrainConfig", "Trainer", "TrainState", "default_config", "train",
    "MiniConfig", "UnlearnError", "UnlearnResult", "pad_request", "unlearn", "unlearn_core", "unlearn_many",
]
__version__ = "0.1.0"
