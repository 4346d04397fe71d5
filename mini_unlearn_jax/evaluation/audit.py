"""Audit of stored parameter sets: does any artefact of a run remember removed examples?

A run stores more than its model: a trajectory buffer, a snapshot buffer, perhaps the initial
parameters. Unlearning that replaces the model but keeps, say, an old snapshot taken while the
removed examples were still trained on leaves them recoverable from the run directory. This
module attacks every stored parameter set with the same membership-inference attack and
compares each with the model.

The attack is the loss threshold (:data:`~mini_unlearn_jax.evaluation.attacks.DEFAULT_ATTACK`):
the score of an example under parameters ``w`` is ``s(x, y) = -l(w; x, y)``, its negative
per-example loss (``log p_y`` for cross-entropy), and a set's figure is the ROC-AUC of members
(the removed examples) against non-members (examples no model trained on),

    AUC(w) = P[s(member) > s(non-member)] + 1/2 P[s(member) = s(non-member)],

0.5 when the parameters cannot tell the two apart, 1 when every removed example has a lower
loss than every non-member. As :func:`~mini_unlearn_jax.evaluation.privacy.default_mia` does,
the larger of the two sets is subsampled (seeded) to the size of the smaller one, the same
examples for every parameter set, so the rows are compared on paired data.

The verdict: FAIL when some stored set's AUC exceeds the model's by more than ``tolerance``
(it remembers the removed examples better than the model does), PASS otherwise. It is a
relative test: a model that itself remembers them (unlearning never ran, or failed) passes as
long as nothing stored remembers more; the model's own AUC is in the report for that reading.

The losses of all sets are computed by one jitted program, ``jax.lax.map`` over the sets
stacked along a leading axis (one compilation for any number of sets of the same shapes). For
the softmax cross-entropy the score is taken without saturating: in float32
``logsumexp(z) - z_y`` rounds to exactly 0 once an example is fit with a margin of about 17
nats, so a confident model (a calibrated one, its head scaled up) would tie its members and
non-members at AUC 0.5. The loss is ``softplus(-phi)`` of the logit-scaled confidence
``phi = z_y - logsumexp_{c != y} z_c``
(:func:`~mini_unlearn_jax.evaluation.attacks.logit_confidence`, finite and exact there), an
increasing function of ``-loss``; ``phi`` itself is the score, which orders the examples as
``-loss`` does in exact arithmetic and so has the same ROC curve and AUC.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..core.models import Objective, cross_entropy
from . import attacks as A
from .privacy import auc_standard_error, balanced_indices

Params = Any

DEFAULT_TOLERANCE = 0.03
PASS, FAIL = "PASS", "FAIL"


@dataclasses.dataclass(frozen=True)
class AuditRow:
    """The attack on one stored parameter set.

    Attributes:
      name: what the set is, e.g. ``model``, ``trajectory[3] step 9``, ``params0``.
      step: the training step it was taken at, where known (else None).
      auc: ROC-AUC of the loss attack (members = the removed examples).
      auc_se: its Hanley & McNeil standard error.
      advantage: ``max |TPR - FPR|`` over thresholds.
      tpr_at_1pct_fpr: the largest TPR at FPR <= 1 %.
      gap_to_model: ``auc - model's auc``.
      remembers_more: ``gap_to_model > tolerance`` (always False for the model itself).
    """

    name: str
    step: int | None
    auc: float
    auc_se: float
    advantage: float
    tpr_at_1pct_fpr: float
    gap_to_model: float
    remembers_more: bool


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """The audit of a set of stored parameters (:func:`audit_params`).

    Attributes:
      rows: one :class:`AuditRow` per parameter set, in the order given.
      model: the name of the row that is the model.
      model_auc: the model's AUC.
      worst: the row with the highest AUC (the model's row on a tie).
      tolerance: how far above the model's AUC a stored set may lie.
      verdict: ``"FAIL"`` when a stored set's AUC exceeds ``model_auc + tolerance``, else
        ``"PASS"``.
      n_members, n_nonmembers: the examples scored (after balancing).
      balanced: whether the larger set was subsampled to the size of the smaller.
      seed: the seed of that subsampling.
      notes: remarks for the reader (e.g. forget examples the run has not removed).
      info: further facts about what was audited (the run, its data), JSON-able.
    """

    rows: tuple[AuditRow, ...]
    model: str
    model_auc: float
    worst: AuditRow
    tolerance: float
    verdict: str
    n_members: int
    n_nonmembers: int
    balanced: bool
    seed: int
    notes: tuple[str, ...] = ()
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    @property
    def failing(self) -> tuple[AuditRow, ...]:
        """The stored sets that remember the members better than the model does."""
        return tuple(r for r in self.rows if r.remembers_more)

    def to_dict(self) -> dict:
        """The report as JSON-able data."""
        return {
            "verdict": self.verdict, "attack": A.DEFAULT_ATTACK, "tolerance": self.tolerance,
            "model": self.model, "model_auc": self.model_auc,
            "worst": dataclasses.asdict(self.worst), "n_failing": len(self.failing),
            "n_members": self.n_members, "n_nonmembers": self.n_nonmembers,
            "balanced": self.balanced, "seed": self.seed, "notes": list(self.notes), **self.info,
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }

    def with_context(self, *, notes=(), info: dict | None = None) -> AuditReport:
        """A copy with more ``notes`` and ``info``."""
        return dataclasses.replace(self, notes=self.notes + tuple(notes),
                                   info={**self.info, **(info or {})})


def _is_cross_entropy(objective: Objective) -> bool:
    return objective.example_loss is cross_entropy


@functools.partial(jax.jit, static_argnames=("objective",))
def _stacked_raw(objective: Objective, stacked: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """``[S, B]`` for ``S`` parameter sets stacked along a leading axis: the logit-scaled
    confidence ``phi`` under the cross-entropy (see the module docstring), else the losses."""
    if _is_cross_entropy(objective):
        return jax.lax.map(lambda p: A.logit_confidence(objective.logits(p, x), y), stacked)
    return jax.lax.map(lambda p: objective.losses(p, x, y), stacked)


def stacked_scores(objective: Objective, stacked: Params, x: Any, y: Any, *,
                   chunk: int = 8192) -> np.ndarray:
    """Loss-attack scores ``[S, n]`` (float64, higher = member) of ``S`` parameter sets stacked
    along a leading axis: ``-loss``, or under the softmax cross-entropy the logit-scaled
    confidence ``phi`` (``loss = softplus(-phi)``: the same order, without float32's rounding of
    confidently fit examples' losses to 0; see the module docstring).

    One jitted ``jax.lax.map`` over the sets; the examples go in chunks of ``chunk`` (the last
    one padded to full size, so one program serves every chunk).
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    n = int(x.shape[0])
    size = min(chunk, n)
    pad = -n % size
    if pad:
        x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)])
        y = jnp.concatenate([y, jnp.repeat(y[-1:], pad, axis=0)])
    out = [np.asarray(_stacked_raw(objective, stacked, x[i:i + size], y[i:i + size]), np.float64)
           for i in range(0, n + pad, size)]
    raw = np.concatenate(out, axis=1)[:, :n]
    return raw if _is_cross_entropy(objective) else -raw


def _signature(params: Params):
    leaves, treedef = jax.tree.flatten(params)
    return treedef, tuple((np.shape(a), jnp.result_type(a)) for a in leaves)


def param_set_scores(objective: Objective, param_sets: Mapping[str, Params], x: Any,
                     y: Any) -> dict[str, np.ndarray]:
    """``{name: [n] loss-attack scores}`` (:func:`stacked_scores`) of every parameter set on
    ``(x, y)``.

    Sets with the same tree structure, shapes and dtypes (normally all of them) are stacked and
    evaluated by one :func:`stacked_scores` call.
    """
    groups: dict[Any, list[str]] = {}
    for name, params in param_sets.items():
        groups.setdefault(_signature(params), []).append(name)
    out: dict[str, np.ndarray] = {}
    for names in groups.values():
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *(param_sets[k] for k in names))
        out.update(zip(names, stacked_scores(objective, stacked, x, y), strict=True))
    return out


def audit_params(
    objective: Objective,
    param_sets: Mapping[str, Params],
    x_forget: Any,
    y_forget: Any,
    x_nonmember: Any,
    y_nonmember: Any,
    *,
    model: str = "model",
    steps: Mapping[str, int | None] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    balance: bool = True,
) -> AuditReport:
    """Loss-attack every stored parameter set and compare it with the model.

    Members are ``(x_forget, y_forget)``, non-members ``(x_nonmember, y_nonmember)``; with
    ``balance`` the larger set is subsampled to the size of the smaller
    (:func:`~mini_unlearn_jax.evaluation.privacy.balanced_indices` with ``seed``), the same
    examples for every set. Each set's AUC is that of the score ``-loss`` (the objective's
    per-example loss; :func:`stacked_scores`), computed by
    :func:`~mini_unlearn_jax.evaluation.attacks.roc_metrics`.

    Args:
      objective: the objective all sets share (its ``losses`` give the scores).
      param_sets: ``{name: params}``; ``param_sets[model]`` is the model, the rest are the
        stored artefacts.
      x_forget, y_forget: the removed examples (members).
      x_nonmember, y_nonmember: examples no parameter set was trained on (non-members).
      model: the key of the model in ``param_sets``.
      steps: ``{name: training step}`` where known.
      tolerance: how far a stored set's AUC may exceed the model's before the verdict is FAIL.
      seed: seeds the balancing subsample.
      balance: subsample to equal counts (True) or score both sets whole.

    Returns:
      An :class:`AuditReport`: FAIL when ``auc(set) > auc(model) + tolerance`` for some stored set.

    Raises:
      ValueError: ``model`` not in ``param_sets``, a negative or non-finite tolerance, or
        empty / mismatched example sets.
    """
    if model not in param_sets:
        raise ValueError(f"param_sets has no entry {model!r} for the model "
                         f"(it holds {', '.join(param_sets)})")
    tolerance = float(tolerance)
    if not (np.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    if len(x_forget) != len(y_forget) or len(x_nonmember) != len(y_nonmember):
        raise ValueError("x and y of the forget / non-member sets must have the same length")
    if len(x_forget) < 1 or len(x_nonmember) < 1:
        raise ValueError(f"need at least one member and one non-member, got {len(x_forget)} and "
                         f"{len(x_nonmember)}")
    mem, non = balanced_indices(len(x_forget), len(x_nonmember), seed=seed, balance=balance)
    xf, yf = np.asarray(x_forget)[mem], np.asarray(y_forget)[mem]
    xn, yn = np.asarray(x_nonmember)[non], np.asarray(y_nonmember)[non]
    scores = param_set_scores(objective, param_sets, np.concatenate([xf, xn]),
                              np.concatenate([yf, yn]))
    nf = len(mem)
    metrics = {name: A.roc_metrics(v[:nf], v[nf:]) for name, v in scores.items()}
    model_auc = metrics[model]["auc"]
    steps = dict(steps or {})
    rows = []
    for name in param_sets:
        m = metrics[name]
        gap = m["auc"] - model_auc
        step = steps.get(name)
        rows.append(AuditRow(name=name, step=None if step is None else int(step), auc=m["auc"],
                             auc_se=auc_standard_error(m["auc"], m["n_members"], m["n_nonmembers"]),
                             advantage=m["advantage"], tpr_at_1pct_fpr=m["tpr_at_1pct_fpr"],
                             gap_to_model=gap,
                             remembers_more=bool(name != model and gap > tolerance)))
    model_row = next(r for r in rows if r.name == model)
    worst = max(rows, key=lambda r: (r.auc, r.name == model))
    verdict = FAIL if any(r.remembers_more for r in rows) else PASS
    return AuditReport(rows=tuple(rows), model=model, model_auc=model_row.auc, worst=worst,
                       tolerance=tolerance, verdict=verdict, n_members=nf, n_nonmembers=len(non),
                       balanced=bool(balance), seed=int(seed))
