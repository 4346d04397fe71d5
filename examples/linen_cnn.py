"""Unlearning a flax.linen CNN: train with ``mu.Trainer``, remove 10 %, compare with retraining.

A small CNN memorises 4,000 Fashion-MNIST images (Adam, 40 epochs) while a trajectory buffer
keeps 12 log-spaced snapshots of its parameters. ``mu.unlearn`` then removes a random 10 % of
the training set by trajectory unlearning (rewind to a snapshot that fits the removed images no
better than unseen ones, retrain briefly on the rest, recalibrate), and the result is compared
with retraining from the same initialisation without them (``method="retrain"``).

Run: ``python examples/linen_cnn.py``; the last line printed is the JSON of examples/README.md.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
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
objective = mu.make_objective(model, l2=0.0)

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
result = mu.unlearn(problem, forget, head=("Dense_1",))
# the same request twice more (compiled already): the median time is robust to a busy CPU
reruns = [mu.unlearn(problem, forget, head=("Dense_1",)).time_s for _ in range(2)]
retrained = mu.unlearn(problem, forget, method="retrain")  # the reference: the recipe without them

report(objective, data, forget, original=state.params, result=result, retrained=retrained.params,
       unlearn_runs_s=[result.time_s, *reruns], retrain_s=retrained.time_s)
