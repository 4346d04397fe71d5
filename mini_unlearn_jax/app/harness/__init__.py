"""A resumable experiment grid: datasets x models x methods x ratios x seeds.

The grid is a :class:`GridConfig`, written in a TOML file (see ``experiments/grid/grid.toml`` and
``experiments/fidelity/fidelity.toml``) or built in Python and passed to :func:`run_grid`::

    out = "experiments/grid/results"
    seeds = [0, 1, 2]
    ratios = [0.01, "5%", 0.1, "class0", "seq5x0.1"]   # fractions, percents, classK, seqMxF
    methods = ["mini", "mini-lite", "newton", "finetune:steps=20"]
    mia = true
    [[models]]
    data = "fashion_mnist:n_train=10000"
    model = "logreg"
    l2 = 1e-3

Methods are the registered ones (``mini_unlearn_jax.METHODS``, including any registered at run time); ``NAME:KEY=VALUE[+KEY=VALUE...]`` passes options to ``run_method`` and
is reported under that label. A model entry takes ``data``, ``model``, ``l2``, ``hidden``,
``penalize_bias`` and any :class:`~mini_unlearn_jax.core.training.TrainConfig` field (``steps``,
``batch_size``, ...) replacing the model's default recipe, or ``recipe = NAME`` of
:data:`~mini_unlearn_jax.app.recipes.RECIPES` (whose settings the entry's keys replace); it is
trained by :func:`~mini_unlearn_jax.app.recipes.build_problem`.

Every cell (data, model, seed, ratio, method) becomes one row of ``results.jsonl``, appended as
soon as it is done (a later row of the same cell replaces an earlier one). With ``resume = true``
(the default) cells already there are skipped, so an interrupted run resumes where it stopped
and several workers with disjoint configs may share one output directory; with ``resume =
false`` every cell of the config reruns and replaces its earlier row (rows of other cells are
kept; ``fresh=True`` / ``--fresh`` discards them all). A method that raises, or does not apply
to the model (``mini_unlearn_jax.applicable``), gets a row with
``converged = false`` and the reason. ``reference_rows = true`` adds a row for the reference
(``retrain``) of every (model, ratio) where it ran. A dataset that cannot be loaded here (e.g.
``tfds:higgs`` without a network) is skipped with a message.

Reports (``report``): ``"grid"`` writes ``results.csv``, ``results.json`` (the rows), a Markdown
table of mean ± std over seeds and PNG plots at the end of the run; ``"fidelity"`` writes after
every cell ``results.json`` (``{"runs", "models", "rows"}``: each run's command, machine and
library version, each trained model's recipe and cost), ``results.csv``, ``table.md`` (one
table per metric, every cell, the ``targets`` check) and ``fidelity_vs_time.png``.

Protocol: the forget set of ratio ``rho`` is ``sort(default_rng(seed).choice(n, round(rho n)))``
(as ``mini-unlearn unlearn --ratio rho --seed seed``); ``classK`` removes every training example
of class K; ``seqMxF`` runs M successive requests of fraction F of the original data (each on the
previous result) against retraining on the cumulative remainder. Every method is compared with
``retrain`` of the same cell (the registry's ground truth) except a method registered with its own
reference (``own_reference``: DeltaGrad's ``deltagrad_retrain``, which replays its own (S)GD
trajectory with the same options), against which it is scored, its original model being
``info['own_original']``. In a row, ``kl_ratio`` = KL(p_R || p_U) / KL(p_R || p_original) on the
test set, ``rel_param_error`` = ||w_U - w_R|| / ||w_original - w_R||, ``time_ratio`` = the method's
time / its reference's (both without compilation, which ``compile_s`` reports), and
``memory_bytes`` the training history the method keeps: snapshot buffer + curvature statistics
for the mini variants, DeltaGrad's per-step cache, 0 for the others.
"""


from __future__ import annotations

import sys
from pathlib import Path

from .config import (
    METRICS,
    REPORTS,
    GridConfig,
    load_rows,
    parse_method,
    parse_ratio,
    pct_ratio,
    ratio_pct,
)
from .fidelity import FIDELITY_COLUMNS
from .reports import summarize, write_reports
from .run import library_version, machine_info, run_grid


def main(argv=None) -> int:
    """``python experiments/grid/run.py CONFIG.toml [--out DIR] [--fresh]``: run or resume a grid."""
    import argparse

    ap = argparse.ArgumentParser(description="Run (or resume) an unlearning grid from a TOML config.")
    ap.add_argument("config")
    ap.add_argument("--out", help="override the config's output directory")
    ap.add_argument("--fresh", action="store_true", help="discard the rows of earlier runs in the output directory")
    args = ap.parse_args(argv)
    cfg = GridConfig.load(args.config)
    if args.out:
        cfg.out = args.out
    run_grid(cfg, fresh=args.fresh, command="python experiments/grid/run.py " + " ".join(argv or sys.argv[1:]))
    print(Path(cfg.out) / "table.md")
    return 0


__all__ = ["FIDELITY_COLUMNS", "METRICS", "REPORTS", "GridConfig", "library_version", "load_rows", "machine_info",
           "main", "parse_method", "parse_ratio", "pct_ratio", "ratio_pct", "run_grid", "summarize", "write_reports"]
