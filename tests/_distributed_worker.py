"""One process of the two-process test in ``tests/test_distributed.py`` (not a test module).

    python tests/_distributed_worker.py PROCESS_ID PORT IN.pkl OUT.npz

Joins a two-process JAX cluster on ``localhost:PORT`` (CPU collectives over gloo, two host CPU
devices per process), builds a ``Mesh`` over the four devices of both processes and runs the
README's multi-host recipe: ``fixed_point_unlearn(..., config=MiniConfig(mesh=mesh, mesh_axis="data"))`` on
the trained model pickled in ``IN.pkl``. Writes the unlearned parameters and what the run saw
to ``OUT.npz``.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import pickle  # noqa: E402

import jax  # noqa: E402

process_id, port, inp, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id,
                           initialization_timeout=60)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import mini_unlearn_jax as mu  # noqa: E402
from mini_unlearn_jax.core.mini import removed_grad_sum  # noqa: E402

with open(inp, "rb") as f:
    d = pickle.load(f)
model = mu.build_model("logreg", d["classes"])
obj = mu.make_objective(model, d["l2"])
mesh = Mesh(np.array(jax.devices()), ("data",))
res = mu.fixed_point_unlearn(obj, d["params"], d["snapshots"], d["x"], d["y"], d["forget"], stats=d["stats"],
                 config=mu.MiniConfig(chunk=64, mesh=mesh, mesh_axis="data"))
w = ravel_pytree(res.params)[0]

# the removed examples' gradient sum with its rows split over both processes' devices: the
# compiled program holds a cross-device reduction and equals the unsharded sum
n_rm = 128
xr = jax.device_put(jnp.asarray(d["x"][:n_rm]), NamedSharding(mesh, P("data")))
f = jax.jit(lambda p, x: removed_grad_sum(obj, p, x, jnp.asarray(d["y"][:n_rm]), jnp.ones(n_rm), 64, mesh),
            out_shardings=NamedSharding(mesh, P()))
hlo = f.lower(d["params"], xr).compile().as_text()
g_sharded = ravel_pytree(f(d["params"], xr))[0]

np.savez(out, params=np.asarray(w), converged=bool(res.converged), reason=str(res.reason()),
         process_count=jax.process_count(), device_count=jax.device_count(),
         local_device_count=jax.local_device_count(),
         result_processes=sorted({dev.process_index for dev in w.sharding.device_set}),
         hlo_has_all_reduce=("all-reduce" in hlo) or ("reduce-scatter" in hlo),
         removed_grad_sharded=np.asarray(g_sharded))
print(f"process {process_id}: done", flush=True)
