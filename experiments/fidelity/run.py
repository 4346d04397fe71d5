"""Evidence table: Mini-Unlearning vs baselines at high unlearning ratios (method.md §5).

The grid ``experiments/fidelity/fidelity.toml`` (multinomial logistic regression on all of Fashion-MNIST,
a 2-layer MLP on a subset; ratios 1-50 %; every method), run by the grid harness
(:mod:`mini_unlearn_jax.app.harness`): each cell removes a uniform random forget set and compares
the unlearned model with the model retrained on the remaining data, measured in the same run::

    python experiments/fidelity/run.py                                   # everything (long)
    python experiments/fidelity/run.py --models logreg                   # logreg, all ratios/methods
    python experiments/fidelity/run.py --models mlp --ratios 10,30,50    # adds/replaces MLP cells

The flags select and override parts of the grid. Outputs (``--out``, default
``experiments/fidelity/results/``): ``results.csv``, ``results.json`` (one row per cell plus the
configuration of every run and trained model), ``table.md``, ``fidelity_vs_time.png`` and the
harness's ``results.jsonl``. Rows of earlier runs in ``--out`` are kept unless the same cell
(model, method, ratio, seed, data) is rerun, or ``--fresh`` is given; outputs are rewritten after
every cell, so an interrupted run leaves its finished cells. The protocol (forget sets,
DeltaGrad's own reference, what ``kl_ratio``, ``rel_param_error`` and ``memory_bytes`` measure)
is the harness's; ``table.md`` restates it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mini_unlearn_jax as mu
from mini_unlearn_jax.app.harness import GridConfig, parse_method, pct_ratio, run_grid

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CONFIG = HERE / "fidelity.toml"


def _items(text: str, flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise SystemExit(f"--{flag}: give a comma-separated list")
    return items


def _data_spec(spec: str, name: str | None, n_train: int | None) -> str:
    """``spec`` with its dataset name and/or its ``n_train`` option replaced."""
    head, _, opts = spec.partition(":")
    fields = dict(o.split("=", 1) for o in opts.split(",") if o)
    if n_train is not None:
        fields["n_train"] = str(n_train)
    return (name or head) + (":" + ",".join(f"{k}={v}" for k, v in fields.items()) if fields else "")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(CONFIG), help="the grid (default: experiments/fidelity/fidelity.toml)")
    p.add_argument("--models", help="comma list of the config's models (logreg,mlp; default: all)")
    p.add_argument("--ratios", help="comma list of unlearning ratios in percent, 0 < r < 100 (default: the config's)")
    p.add_argument("--methods", help="comma list of registered methods (default: the config's; retrain always runs "
                                     "as the reference); a method may carry options for run_method as "
                                     "NAME:KEY=VALUE[+KEY=VALUE...], e.g. deltagrad:lr=0.1, reported under that label")
    p.add_argument("--seed", type=int, help="seeds the init, the batch order and the forget sets (default: 0)")
    p.add_argument("--data", help="dataset name for load_dataset, replacing the config's (fashion_mnist)")
    p.add_argument("--logreg-n-train", type=int, help="logreg training examples (default: all)")
    p.add_argument("--logreg-l2", type=float, help="default: 1e-3")
    p.add_argument("--mlp-n-train", type=int, help="MLP training examples, the first N (default: 10000)")
    p.add_argument("--mlp-l2", type=float, help="default: 1e-4")
    p.add_argument("--hidden", type=int, help="MLP hidden width (default: 256)")
    p.add_argument("--out", help="output directory (default: experiments/fidelity/results)")
    p.add_argument("--fresh", action="store_true", help="discard rows of earlier runs in --out")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> GridConfig:
    """The config file with the flags applied."""
    cfg = GridConfig.load(args.config)
    by_name = {m["model"]: m for m in cfg.models}
    if args.models:
        chosen = _items(args.models, "models")
        bad = [m for m in chosen if m not in by_name]
        if bad:
            raise SystemExit(f"--models: unknown {bad}; choose from {', '.join(by_name)}")
        cfg.models = [by_name[m] for m in chosen]
    overrides = {"logreg": {"n_train": args.logreg_n_train, "l2": args.logreg_l2},
                 "mlp": {"n_train": args.mlp_n_train, "l2": args.mlp_l2, "hidden": args.hidden}}
    for m in cfg.models:
        o = overrides.get(m["model"], {})
        m["data"] = _data_spec(m["data"], args.data, o.get("n_train"))
        m.update({k: o[k] for k in ("l2", "hidden") if o.get(k) is not None})
    if args.ratios:
        try:
            cfg.ratios = [pct_ratio(float(r)) for r in _items(args.ratios, "ratios")]
        except ValueError as e:
            raise SystemExit(f"--ratios: {e}") from None
    if args.methods:
        try:  # retrain runs anyway (the reference): its rows come with every ratio
            cfg.methods = [m for m in _items(args.methods, "methods") if not mu.get_method(parse_method(m)[0]).ground_truth]
        except ValueError as e:
            raise SystemExit(f"--methods: {e}") from None
    if args.seed is not None:
        cfg.seeds = [args.seed]
    out = Path(args.out or cfg.out)
    cfg.out = str(out if out.is_absolute() or args.out else REPO / out)
    try:
        cfg.validate()
    except ValueError as e:
        raise SystemExit(f"experiments/fidelity/run.py: {e}") from None
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = build_config(args)
    run_grid(cfg, fresh=args.fresh)
    print(Path(cfg.out) / "table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
