"""Unlearning a flax.nnx CNN: adapt the module, train its parameters, write the result back.

``mu.as_model(module)`` turns an nnx module into a pure ``apply_fn(params, x)`` over a plain
dict of its ``nnx.Param`` values, the form every library routine works on. The example trains
those parameters with ``mu.Trainer`` (keeping a trajectory buffer), removes a random 10 % of the
4,000 Fashion-MNIST training images with ``mu.unlearn``, compares with retraining from the same
initialisation, and writes the unlearned parameters back into the module with
``mu.update_module`` (``adapter.rebuild(params)`` would return a new module instead).

Run: ``python examples/nnx_cnn.py``; the last line printed is the JSON of examples/README.md.
"""

import jax.numpy as jnp
import numpy as np
from _common import forget_set, load, report
from flax import nnx

import mini_unlearn_jax as mu


class CNN(nnx.Module):
    """Two strided convolutions, a hidden layer and a linear head: ``[B, 28, 28, 1] -> [B, 10]``."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, (4, 4), strides=4, rngs=rngs)  # 7 x 7 x 8
        self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)  # 4 x 4 x 16
        self.hidden = nnx.Linear(4 * 4 * 16, 512, rngs=rngs)
        self.head = nnx.Linear(512, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
        return self.head(nnx.relu(self.hidden(x.reshape((x.shape[0], -1)))))


data = load()  # 4,000 training images; 500 held-out test images for the method, 5,000 for the metrics
model = CNN(nnx.Rngs(0))
adapter = mu.as_model(model)  # adapter.params: {"conv1": {"kernel": ..., "bias": ...}, ...}
objective = mu.make_objective(adapter, l2=0.0)
params0 = adapter.params

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
result = mu.unlearn(problem, forget, head=("head",))
# the same request twice more (compiled already): the median time is robust to a busy CPU
reruns = [mu.unlearn(problem, forget, head=("head",)).time_s for _ in range(2)]
retrained = mu.unlearn(problem, forget, method="retrain")  # the reference: the recipe without them

mu.update_module(model, result.params)  # the module itself now carries the unlearned parameters
x = jnp.asarray(data.x_test[:256])
assert np.allclose(model(x), objective.logits(result.params, x), atol=1e-5)

report(objective, data, forget, original=state.params, result=result, retrained=retrained.params,
       unlearn_runs_s=[result.time_s, *reruns], retrain_s=retrained.time_s)
