"""Fidelity metrics of an unlearned model against the retrained one."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ..core.models import Objective


@functools.partial(jax.jit, static_argnames=("objective",))
def _log_softmax(objective: Objective, params, xb):
    return jax.nn.log_softmax(objective.logits(params, xb), axis=-1)


def log_probs(objective: Objective, params, x, chunk: int = 8192) -> np.ndarray:
    """Log class probabilities ``[n, C]`` (float64 numpy), computed in chunks (one compiled program
    per objective and chunk shape, reused across calls)."""
    x = jnp.asarray(x)
    out = [np.asarray(_log_softmax(objective, params, x[i : i + chunk]), np.float64) for i in range(0, x.shape[0], chunk)]
    return np.concatenate(out) if out else np.zeros((0, 0))


def predict_probs(objective: Objective, params, x, chunk: int = 8192) -> np.ndarray:
    """Class probabilities ``[n, C]`` (float64 numpy), computed in chunks."""
    return np.exp(log_probs(objective, params, x, chunk))


def accuracy(probs: np.ndarray, y) -> float:
    if len(probs) == 0:
        return float("nan")
    return float(np.mean(np.argmax(probs, -1) == np.asarray(y)))


def mean_kl(p_ref: np.ndarray, p: np.ndarray, eps: float = 1e-12) -> float:
    """Mean over examples of ``KL(p_ref || p)``."""
    p_ref = np.clip(p_ref, eps, 1.0)
    p = np.clip(p, eps, 1.0)
    return float(np.mean(np.sum(p_ref * (np.log(p_ref) - np.log(p)), axis=-1)))


def agreement(p_ref: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(np.argmax(p_ref, -1) == np.argmax(p, -1)))


def mean_t_interval(values) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of ``values`` (e.g. one per seed) and its 95 % Student-t
    interval; NaN bounds for a single value."""
    from scipy import stats

    v = np.asarray(values, np.float64)
    mean = float(v.mean())
    if v.size < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return mean, mean - half, mean + half


def compare_abs_gaps(method_gaps, baseline_gaps) -> dict:
    """Per-seed AUC gaps (to the reference) of a method and a baseline: ``mean_abs`` (the two
    mean |gap|), ``no_larger`` (the method's mean |gap| is at most the baseline's) and
    ``difference``, the :func:`mean_t_interval` of |gap(method)| - |gap(baseline)| over seeds."""
    am, ab = np.abs(np.asarray(method_gaps, np.float64)), np.abs(np.asarray(baseline_gaps, np.float64))
    return {"mean_abs": (float(am.mean()), float(ab.mean())), "no_larger": bool(am.mean() <= ab.mean()),
            "difference": mean_t_interval(am - ab)}


def param_distance(a, b) -> float:
    return float(jnp.linalg.norm(ravel_pytree(a)[0] - ravel_pytree(b)[0]))


def rel_param_error(unlearned, retrained, original) -> float:
    """``||w_U - w_R|| / ||w* - w_R||``: below 1 is closer to retraining than doing nothing."""
    return param_distance(unlearned, retrained) / max(param_distance(original, retrained), 1e-30)
