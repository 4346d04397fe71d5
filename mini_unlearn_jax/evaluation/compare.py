"""One evaluation of an unlearned model: `evaluate` (the model alone) and `compare` (against the
retrained model and the original). The CLI's report and the grid harness (so every experiment
run through it) read their figures from here, so a figure means the same thing in both.

A removal request is a set of training indices `forget` (the rows of `x` that are removed); the
retain set is every other row. With `p_U`, `p_R`, `p_O` the class probabilities of the unlearned,
retrained and original models:

- accuracy on the retain set, the forget set and the test set (`retain_acc`, `forget_acc`,
  `test_acc`), for each of the three models in `compare` (`retrain_*`, `original_*`);
- fidelity to retraining: `kl_test` = mean `KL(p_R || p_U)` over the test set, `kl_ratio` =
  `kl_test / KL(p_R || p_O)` (0: retraining's predictions, 1: no better than not unlearning),
  `kl_forget` on the forget set, `agreement_test` (argmax agreement) and `rel_param_error` =
  `||w_U - w_R|| / ||w_O - w_R||`;
- the forget set's mean cross-entropy (`forget_loss`, `retrain_forget_loss` and their ratio): a
  model that still memorises the removed examples keeps it far below retraining's;
- with `attack=True`, the loss attack (`evaluation/privacy.py` `default_mia`: forget set
  against test examples, balanced) on the unlearned and retrained models: `auc`, `retrain_auc`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.models import Objective
from ..core.problem import keep_mask
from . import metrics as mt

Params = Any


def _forget_loss(p: np.ndarray, y: np.ndarray) -> float:
    if not len(y):
        return float("nan")
    return float(np.mean(-np.log(np.clip(p[np.arange(len(y)), y], 1e-30, 1.0))))


def _accuracies(objective: Objective, params: Params, x, y: np.ndarray, forget: np.ndarray, keep: np.ndarray,
                x_test, y_test) -> tuple[dict, dict]:
    probs = {"test": mt.predict_probs(objective, params, x_test), "forget": mt.predict_probs(objective, params, x[forget]),
             "retain": mt.predict_probs(objective, params, x[keep])}
    acc = {"test_acc": mt.accuracy(probs["test"], y_test), "forget_acc": mt.accuracy(probs["forget"], y[forget]),
           "retain_acc": mt.accuracy(probs["retain"], y[keep])}
    return acc, probs


def _split(x, y, forget) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    forget = np.asarray(forget, np.int64)
    keep = np.flatnonzero(keep_mask(int(np.shape(x)[0]), forget))
    return forget, keep, np.asarray(y)


def evaluate(objective: Objective, params: Params, x, y, forget, x_test, y_test) -> dict[str, float]:
    """`retain_acc`, `forget_acc` and `test_acc` of `params` for removing rows `forget` of `(x, y)`."""
    forget, keep, y = _split(x, y, forget)
    return _accuracies(objective, params, x, y, forget, keep, x_test, np.asarray(y_test))[0]


def compare(objective: Objective, unlearned: Params, retrained: Params, original: Params, x, y, forget,
            x_test, y_test, *, attack: bool = False, seed: int = 0) -> dict[str, float]:
    """Every figure of the module docstring for `unlearned` against `retrained` and `original`.

    Args:
      objective: the models' objective.
      unlearned, retrained, original: the three models' parameters (`original` is the model the
        method started from: the trained model, or a method's own original, e.g. DeltaGrad's).
      x, y: the training set the request refers to; `forget`: the removed rows' indices.
      x_test, y_test: examples no model trained on.
      attack: also run the loss attack on the unlearned and retrained models.
      seed: seeds the attack's balancing subsample.
    """
    forget, keep, y = _split(x, y, forget)
    y_test = np.asarray(y_test)
    row, p_u = _accuracies(objective, unlearned, x, y, forget, keep, x_test, y_test)
    ref, p_r = _accuracies(objective, retrained, x, y, forget, keep, x_test, y_test)
    orig, p_o = _accuracies(objective, original, x, y, forget, keep, x_test, y_test)
    row |= {f"retrain_{k}": v for k, v in ref.items()} | {f"original_{k}": v for k, v in orig.items()}
    kl_test, original_kl = mt.mean_kl(p_r["test"], p_u["test"]), mt.mean_kl(p_r["test"], p_o["test"])
    fl, rfl = _forget_loss(p_u["forget"], y[forget]), _forget_loss(p_r["forget"], y[forget])
    row |= {
        "kl_test": kl_test, "original_kl_test": original_kl, "kl_ratio": kl_test / max(original_kl, 1e-30),
        "kl_forget": mt.mean_kl(p_r["forget"], p_u["forget"]),
        "agreement_test": mt.agreement(p_r["test"], p_u["test"]),
        "rel_param_error": mt.rel_param_error(unlearned, retrained, original),
        "param_error": mt.param_distance(unlearned, retrained),
        "forget_loss": fl, "retrain_forget_loss": rfl, "forget_loss_ratio": fl / max(rfl, 1e-30),
    }
    if attack:
        from .privacy import default_mia

        att = default_mia(objective, {"u": unlearned, "r": retrained}, x[forget], y[forget], x_test, y_test, seed=seed)
        row["auc"], row["retrain_auc"] = att["u"]["auc"], att["r"]["auc"]
    return row
