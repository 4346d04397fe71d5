"""Unlearning a CNN trained by your own jitted optax loop (``jax.lax.scan``), not ``mu.Trainer``.

The loop is the user's: its loss, its mini-batch sampling (a fresh shuffle every epoch, the last
partial batch dropped) and Adam. It threads the library's pure trajectory buffer
``mu.trajectory_buffer`` through the scan next to the optimizer state: ``init(w0)`` records step
0 and ``update(traj, t + 1, params)`` keeps ``w`` at the log-spaced schedule's steps. The recipe
goes to the library as ``mu.TrainConfig(optimizer=optax.adam, ...)`` so that trajectory
unlearning's short retraining runs the same optimizer. The reference is the same compiled loop
on the remaining data (the removed rows masked out of every batch), timed after compilation.

Run: ``python examples/own_loop.py``; the last line printed is the JSON of examples/README.md.
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import forget_set, load, report

import mini_unlearn_jax as mu


class CNN(nn.Module):
    """Two strided convolutions, a hidden layer and a linear head: ``[B, 28, 28, 1] -> [B, 10]``."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (4, 4), strides=4)(x))  # 7 x 7 x 8
        x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))  # 4 x 4 x 16
        x = nn.relu(nn.Dense(512)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(x)  # the head: params["Dense_1"]


data = load()  # 4,000 training images; 500 held-out test images for the method, 5,000 for the metrics
model = CNN()
params0 = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
n, BATCH, LR = len(data.y_train), 128, 2e-3
STEPS = 40 * (n // BATCH)  # 40 epochs
buffer = mu.trajectory_buffer(mu.log_schedule(STEPS, 12))
opt = optax.adam(LR)


def train(params, x, y, keep, key):
    """STEPS Adam steps on shuffled mini-batches; rows with ``keep == 0`` are masked out of every
    batch. Returns the parameters and the trajectory buffer."""

    def loss(p, xb, yb, wb):  # mean cross-entropy over the batch's kept rows
        ce = optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xb), yb)
        return jnp.sum(wb * ce) / jnp.maximum(jnp.sum(wb), 1.0)

    def step(carry, t):
        p, opt_state, traj = carry
        per_epoch = x.shape[0] // BATCH
        perm = jax.random.permutation(jax.random.fold_in(key, t // per_epoch), x.shape[0])
        i = jax.lax.dynamic_slice(perm, ((t % per_epoch) * BATCH,), (BATCH,))
        updates, opt_state = opt.update(jax.grad(loss)(p, x[i], y[i], keep[i]), opt_state, p)
        p = optax.apply_updates(p, updates)
        return (p, opt_state, buffer.update(traj, t + 1, p)), None  # w after step t + 1

    carry = (params, opt.init(params), buffer.init(params))  # buffer.init records w0 as step 0
    (params, _, traj), _ = jax.lax.scan(step, carry, jnp.arange(STEPS))
    return params, traj


x, y, key = jnp.asarray(data.x_train), jnp.asarray(data.y_train), jax.random.key(1)
ones = jnp.ones(n)
run = jax.jit(train).lower(params0, x, y, ones, key).compile()  # one program for both trainings
params, traj = run(params0, x, y, ones, key)

objective = mu.make_objective(model, l2=0.0)  # the same loss as the loop's
recipe = mu.TrainConfig(optimizer=optax.adam, learning_rate=LR, steps=STEPS, batch_size=BATCH)
problem = mu.make_problem(objective, params, x, y, recipe=recipe, params0=params0,
                          trajectory=traj, heldout=data.heldout)
forget = forget_set(n)  # a random 10 % of the training rows
result = mu.unlearn(problem, forget, head=("Dense_1",))  # naming the head skips probing for it
# the same request twice more (compiled already): the median time is robust to a busy CPU
reruns = [mu.unlearn(problem, forget, head=("Dense_1",)).time_s for _ in range(2)]

keep = jnp.asarray(np.isin(np.arange(n), forget, invert=True), jnp.float32)
t0 = time.perf_counter()
retrained, _ = jax.block_until_ready(run(params0, x, y, keep, key))  # the reference, compiled above
retrain_s = time.perf_counter() - t0

report(objective, data, forget, original=params, result=result, retrained=retrained,
       unlearn_runs_s=[result.time_s, *reruns], retrain_s=retrain_s)
