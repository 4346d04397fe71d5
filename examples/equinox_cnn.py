"""Unlearning an equinox CNN: adapt the module, train its arrays, recombine the result.

``mu.as_model(module)`` splits an equinox module into its inexact arrays (the parameters, a
pytree shaped like the module) and the rest, and maps the per-example module over the batch.
The example trains those parameters with ``mu.Trainer`` (keeping a trajectory buffer), removes a
random 10 % of the 4,000 Fashion-MNIST training images with ``mu.unlearn``, compares with
retraining from the same initialisation, and gets the unlearned module back with
``adapter.rebuild(params)``. equinox is an optional extra (``pip install equinox``).

Run: ``python examples/equinox_cnn.py``; the last line printed is the JSON of examples/README.md.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _common import forget_set, load, report

import mini_unlearn_jax as mu


class CNN(eqx.Module):
    """Two strided convolutions, a hidden layer and a linear head, for one image ``[28, 28, 1]``."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    hidden: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.conv1 = eqx.nn.Conv2d(1, 8, 4, stride=4, key=k1)  # 8 x 7 x 7
        self.conv2 = eqx.nn.Conv2d(8, 16, 3, stride=2, padding=1, key=k2)  # 16 x 4 x 4
        self.hidden = eqx.nn.Linear(16 * 4 * 4, 512, key=k3)
        self.head = eqx.nn.Linear(512, 10, key=k4)

    def __call__(self, x):
        x = jnp.transpose(x, (2, 0, 1))  # equinox convolutions are channels-first
        x = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))
        return self.head(jax.nn.relu(self.hidden(x.reshape(-1))))


data = load()  # 4,000 training images; 500 held-out test images for the method, 5,000 for the metrics
model = CNN(jax.random.key(0))
adapter = mu.as_model(model)  # per-example module, vmapped over the batch by the adapter
# Workaround: the parameters are nested in a dict, {"cnn": <the module's arrays>}. An equinox
# module is callable, and the gradient snapshot buffer that mu.Trainer fills takes a callable
# "gradient" for a gradient function (snapshot_buffer's update), so the module-shaped gradient
# itself would be called on the parameters; a dict is not callable.
objective = mu.make_objective(lambda p, x: adapter.apply_fn(p["cnn"], x), l2=0.0)
params0 = {"cnn": adapter.params}

steps = 40 * len(data.y_train) // 128  # 40 epochs of 128 images
# snapshots=0: no gradient snapshot buffer (the convex solver's, unused here), so no full-data
# gradient pass; chunk=steps: one compiled program for the whole run
cfg = mu.TrainConfig(optimizer="adam", learning_rate=2e-3, steps=steps, batch_size=128,
                     snapshots=0, chunk=steps)
trainer = mu.Trainer(objective, cfg, trajectory=mu.trajectory_buffer(mu.log_schedule(steps, 12)))
state = trainer.fit(params0, data.x_train, data.y_train)

problem = mu.make_problem(objective, state.params, data.x_train, data.y_train, recipe=cfg,
                          params0=params0, trajectory=state.trajectory, heldout=data.heldout)
forget = forget_set(len(data.y_train))  # a random 10 % of the training rows
# trajectory unlearning (the model kept a trajectory buffer); naming the head skips probing for it
result = mu.unlearn(problem, forget, head=("cnn", "head"))
# the same request twice more (compiled already): the median time is robust to a busy CPU
reruns = [mu.unlearn(problem, forget, head=("cnn", "head")).time_s for _ in range(2)]
retrained = mu.unlearn(problem, forget, method="retrain")  # the reference: the recipe without them

unlearned_model = adapter.rebuild(result.params["cnn"])  # an equinox CNN again
x = jnp.asarray(data.x_test[:256])
assert np.allclose(jax.vmap(unlearned_model)(x), objective.logits(result.params, x), atol=1e-5)

report(objective, data, forget, original=state.params, result=result, retrained=retrained.params,
       unlearn_runs_s=[result.time_s, *reruns], retrain_s=retrained.time_s)
