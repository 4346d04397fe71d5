"""Data and evaluation shared by the examples (not part of the library).

``load()`` reads a Fashion-MNIST subset as 28x28x1 images and splits its test images into the
held-out set that trajectory unlearning reads and the unread test images every metric uses.
``forget_set()`` draws the random 10 % to remove. ``report()`` prints the examples' last line:
one JSON object comparing the unlearned model with the model retrained without the removed rows.
"""

from __future__ import annotations

import functools
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.metrics import roc_auc_score

import mini_unlearn_jax as mu

N_TRAIN = 4000  # a few thousand images: a small CNN memorises them (near 100 % train accuracy)
N_HELDOUT = 500  # test images the method reads (never trained on, never used for the metrics)
N_TEST = 5000  # test images nobody reads: accuracy and the attack's non-members
FORGET_FRACTION = 0.1
SEED = 0


class Data(NamedTuple):
    x_train: np.ndarray  # [N_TRAIN, 28, 28, 1] float32 in [0, 1]
    y_train: np.ndarray  # [N_TRAIN] int32
    heldout: tuple[np.ndarray, np.ndarray]  # (x_val, y_val): what trajectory unlearning reads
    x_test: np.ndarray  # the unread test images
    y_test: np.ndarray


def load(n_train: int = N_TRAIN) -> Data:
    """The first ``n_train`` Fashion-MNIST training images; test images split held-out / unread.

    ``mu.load_dataset`` returns flattened rows ``[N, 784]``; the CNNs want ``[N, 28, 28, 1]``."""
    ds = mu.load_dataset(f"fashion_mnist:n_train={n_train},n_test={N_HELDOUT + N_TEST}")
    img = lambda a: a.reshape(-1, 28, 28, 1)
    x_test, y_test = img(ds.x_test), ds.y_test
    return Data(img(ds.x_train), ds.y_train, (x_test[:N_HELDOUT], y_test[:N_HELDOUT]),
                x_test[N_HELDOUT:], y_test[N_HELDOUT:])


def forget_set(n: int, fraction: float = FORGET_FRACTION, seed: int = SEED) -> np.ndarray:
    """A random ``fraction`` of the training rows, as sorted indices."""
    return np.sort(np.random.default_rng(seed).choice(n, int(round(fraction * n)), replace=False))


@functools.lru_cache
def _jitted(objective):
    return jax.jit(objective.losses), jax.jit(lambda p, xb: jnp.argmax(objective.logits(p, xb), -1))


def _losses(objective, params, x, y, batch: int = 1000) -> np.ndarray:
    fn = _jitted(objective)[0]
    return np.concatenate([np.asarray(fn(params, jnp.asarray(x[i:i + batch]),
                                         jnp.asarray(y[i:i + batch])))
                           for i in range(0, len(x), batch)])


def _accuracy(objective, params, x, y, batch: int = 1000) -> float:
    fn = _jitted(objective)[1]
    pred = np.concatenate([np.asarray(fn(params, jnp.asarray(x[i:i + batch])))
                           for i in range(0, len(x), batch)])
    return float(np.mean(pred == np.asarray(y)))


def evaluate(objective, params, data: Data, forget) -> dict:
    """Forget-set loss, train / test accuracy, and the loss attack's ROC-AUC: the removed examples
    as members against the unread test images as non-members, score = -loss."""
    lf = _losses(objective, params, data.x_train[forget], data.y_train[forget])
    lt = _losses(objective, params, data.x_test, data.y_test)
    member = np.r_[np.ones(lf.size), np.zeros(lt.size)]
    return {"forget_loss": float(lf.mean()),
            "auc": float(roc_auc_score(member, -np.r_[lf, lt])),
            "test_acc": _accuracy(objective, params, data.x_test, data.y_test),
            "train_acc": _accuracy(objective, params, data.x_train, data.y_train)}


def report(objective, data: Data, forget, *, original, result, retrained, unlearn_runs_s,
           retrain_s: float, **extra) -> dict:
    """Print the comparison and, as the last line, the JSON object: the unlearned model's metrics
    (``result``, what ``mu.unlearn`` returned), ``retrain_*`` for the model ``retrained`` without
    the removed rows, ``original_*`` for the trained model, and ``time_ratio`` = unlearning time /
    retraining time (``retrain_s``), compilation excluded from both. The unlearning time is the
    median of ``unlearn_runs_s``, the run times of the same request repeated (one run takes about a
    second, so a burst of another process's work on a shared CPU can double it; a retraining of
    ten seconds averages such bursts out)."""
    unlearn_s = float(np.median(unlearn_runs_s))
    u, r, o = (evaluate(objective, p, data, forget) for p in (result.params, retrained, original))
    out = {**{k: round(v, 4) for k, v in u.items()},
           **{f"retrain_{k}": round(v, 4) for k, v in r.items()},
           **{f"original_{k}": round(v, 4) for k, v in o.items()},
           "time_ratio": round(unlearn_s / retrain_s, 4),
           "unlearn_s": round(unlearn_s, 3), "unlearn_runs_s": [round(t, 3) for t in unlearn_runs_s],
           "retrain_s": round(retrain_s, 3),
           "unlearn_compile_s": round(result.compile_s, 2), "method": result.method,
           "rewind_step": result.info.get("rewind_step"), "n_train": int(len(data.y_train)),
           "n_removed": int(len(forget)), "n_test": int(len(data.y_test)), **extra}
    print(f"{result.method}: {result.reason}")
    for name, m in (("unlearned", u), ("retrained", r), ("original", o)):
        print(f"{name:10s} forget loss {m['forget_loss']:.3f}  attack AUC {m['auc']:.3f}  "
              f"test acc {m['test_acc']:.4f}  train acc {m['train_acc']:.4f}")
    print(f"time: unlearning {unlearn_s:.3f} s, retraining {retrain_s:.3f} s "
          f"(ratio {out['time_ratio']:.3f}, compilation excluded)")
    print(json.dumps(out), flush=True)
    return out
