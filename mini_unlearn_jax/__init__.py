"""mini-unlearn-jax: machine unlearning with minimal gradient snapshots, in JAX."""

from .data import DataError, Dataset, load_dataset
from .models import MLP, LogisticRegression, Objective, build_model, init_params, make_objective
from .snapshots import SnapshotBuffer, SnapshotState, snapshot_buffer
from .training import TrainConfig, Trainer, TrainState, default_config, train

__all__ = [
    "Dataset", "DataError", "load_dataset",
    "MLP", "LogisticRegression", "Objective", "build_model", "init_params", "make_objective",
    "SnapshotBuffer", "SnapshotState", "snapshot_buffer",
    "TrainConfig", "Trainer", "TrainState", "default_config", "train",
]
__version__ = "0.1.0"
