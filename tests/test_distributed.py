"""The README's multi-host recipe, run for real: two processes on this machine.

Each process calls ``jax.distributed.initialize`` with a localhost coordinator, uses gloo CPU
collectives and two host CPU devices, and solves one sharded unlearning request over a ``Mesh``
of all four devices (``tests/_distributed_worker.py``). The result must equal the
single-process, single-device result computed here.
"""

import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import mini_unlearn_jax as mu
from mini_unlearn_jax.core.mini import removed_grad_sum

pytestmark = pytest.mark.slow  # end-to-end: the quick tier (-m "not slow") leaves it out

WORKER = Path(__file__).with_name("_distributed_worker.py")
TIMEOUT_S = 180  # hard limit for both processes together; the test never hangs


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_cluster(inp: Path, tmp: Path) -> list[dict]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["PYTHONUNBUFFERED"] = "1"
    procs, logs = [], []
    for i in range(2):
        log = open(tmp / f"worker{i}.log", "w")  # noqa: SIM115 -- closed below
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(i), str(port), str(inp), str(tmp / f"out{i}.npz")],
                                      stdout=log, stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    tails = "\n".join(f"--- worker {i} (rc {p.returncode}) ---\n" + (tmp / f"worker{i}.log").read_text()[-3000:]
                      for i, p in enumerate(procs))
    assert all(p.returncode == 0 for p in procs), f"a worker failed or timed out after {TIMEOUT_S}s:\n{tails}"
    return [dict(np.load(tmp / f"out{i}.npz")) for i in range(2)]


def test_two_process_sharded_unlearn_equals_single_process(tmp_path):
    ds = mu.load_dataset("synthetic:n=400,d=6,classes=3,seed=2")
    model = mu.build_model("logreg", 3)
    l2 = 1e-2
    obj = mu.make_objective(model, l2)
    p0 = mu.init_params(model, ds.x_train[0], 0)
    st = mu.Trainer(obj, mu.default_config("logreg", 400)).fit(p0, ds.x_train, ds.y_train)
    stats = mu.fit_stats(obj, st.params, ds.x_train)
    forget = np.arange(0, 400, 3)

    ref = mu.fixed_point_unlearn(obj, st.params, st.snapshots, ds.x_train, ds.y_train, forget, stats=stats,
                     config=mu.MiniConfig(chunk=64))
    assert bool(ref.converged), ref.reason()
    w_ref = np.asarray(ravel_pytree(ref.params)[0])
    g_ref = np.asarray(ravel_pytree(removed_grad_sum(obj, st.params, ds.x_train[:128], ds.y_train[:128],
                                                     np.ones(128, np.float32), 64))[0])

    to_np = lambda t: jax.tree.map(np.asarray, t)
    inp = tmp_path / "problem.pkl"
    inp.write_bytes(pickle.dumps({"classes": 3, "l2": l2, "params": to_np(st.params), "snapshots": to_np(st.snapshots),
                                  "stats": to_np(stats), "x": ds.x_train, "y": ds.y_train, "forget": forget}))
    outs = _run_cluster(inp, tmp_path)

    w_star = np.asarray(ravel_pytree(st.params)[0])
    for i, o in enumerate(outs):
        assert int(o["process_count"]) == 2 and int(o["device_count"]) == 4 and int(o["local_device_count"]) == 2, o
        assert bool(o["converged"]), (i, str(o["reason"]))
        # the sharded program ran on the devices of both processes
        assert list(o["result_processes"]) == [0, 1], o["result_processes"]
        assert bool(o["hlo_has_all_reduce"])
        np.testing.assert_allclose(o["removed_grad_sharded"], g_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(o["params"], w_ref, rtol=1e-5, atol=1e-6)
    # the request moved the model (the comparison above is not between two unchanged inputs)
    assert np.linalg.norm(w_ref - w_star) > 1e-2 * np.linalg.norm(w_star)
    np.testing.assert_array_equal(outs[0]["params"], outs[1]["params"])
