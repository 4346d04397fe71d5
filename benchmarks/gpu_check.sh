#!/usr/bin/env bash
# On an accelerator machine: print device info and the unlearn / retrain time ratios for
# Fashion-MNIST logistic regression and an MLP, side by side, in a few minutes.
#   bash benchmarks/gpu_check.sh
# N_LOGREG / N_MLP (default 60000 each) set the training-set sizes, e.g. for a CPU smoke run:
#   N_LOGREG=3000 N_MLP=2000 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# the project's virtualenv when there is one (bash .ci/setup main), else $PYTHON or python3
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
"$PY" - <<'PY'
import os
import time

import jax
import numpy as np

from mini_unlearn_jax.app.recipes import build_problem
from mini_unlearn_jax.core import methods as M

print("devices:", jax.devices(), "| jax", jax.__version__, flush=True)
try:
    print(jax.devices()[0].memory_stats() or {}, flush=True)
except Exception:
    pass

def bench(spec, model_name, l2, ratios, methods, hidden=256):
    t0 = time.perf_counter()
    tr = build_problem(spec, model_name, l2, hidden=hidden)  # the CLI's default recipe, seed 0
    ds, pb = tr.dataset, tr.problem
    print(f"{model_name} on {spec}: trained in {time.perf_counter() - t0:.1f}s", flush=True)
    for ratio in ratios:
        forget = np.sort(np.random.default_rng(0).choice(ds.n_train, int(ratio * ds.n_train), replace=False))
        ret = M.run_method("retrain", pb, forget)
        line = [f"  {model_name} {ratio:>4.0%}: retrain {ret.time_s:7.3f}s"]
        for m in methods:
            out = M.run_method(m, pb, forget)
            ref = M.refresh_for_next_request(pb, out.params, forget) if out.converged else None
            t = out.time_s + (ref.time_s if ref else 0.0)
            line.append(f"{m} {out.time_s:.4f}s + refresh {ref.time_s if ref else float('nan'):.4f}s "
                        f"(x{t / ret.time_s:.4f} with refresh, compile {out.compile_s:.1f}s, {out.reason})")
        print(" | ".join(line), flush=True)

n_lr = int(os.environ.get("N_LOGREG", "60000"))
bench(f"fashion_mnist:n_train={n_lr}", "logreg", 1e-3, (0.01, 0.1, 0.5), ("mini", "mini-lite", "mini-plus"))
n_mlp = int(os.environ.get("N_MLP", "60000"))
bench(f"fashion_mnist:n_train={n_mlp}", "mlp", 1e-4, (0.1, 0.5), ("mini", "mini-lite", "finetune"))
PY
