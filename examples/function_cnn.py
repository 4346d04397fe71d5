"""Unlearning a CNN written as a plain function ``apply_fn(params, x)`` over a hand-made pytree.

No framework: two convolutions with ``jax.lax.conv_general_dilated``, a hidden layer and a
linear head over a nested dict of arrays. ``mu.make_objective(apply_fn, l2)`` takes the function
as it is (the library only ever needs a batched ``apply_fn(params, x) -> logits``). The example
trains with ``mu.Trainer`` (keeping a trajectory buffer), removes a random 10 % of the 4,000
Fashion-MNIST training images with ``mu.unlearn`` and compares with retraining from the same
initialisation.

Run: ``python examples/function_cnn.py``; the last line printed is the JSON of examples/README.md.
"""

import math

import jax
import jax.numpy as jnp
from _common import forget_set, load, report

import mini_unlearn_jax as mu


def init_params(key):
    """He-normal weights and zero biases, ``{"conv1", "conv2", "hidden", "head"}`` of ``{"w", "b"}``."""
    shapes = {"conv1": (4, 4, 1, 8), "conv2": (3, 3, 8, 16), "hidden": (4 * 4 * 16, 512),
              "head": (512, 10)}  # convolutions HWIO, dense layers (in, out)
    keys = jax.random.split(key, len(shapes))
    he = lambda k, s: jax.random.normal(k, s) * math.sqrt(2.0 / math.prod(s[:-1]))
    return {name: {"w": he(k, s), "b": jnp.zeros(s[-1])}
            for k, (name, s) in zip(keys, shapes.items(), strict=True)}


def conv(x, p, stride):
    y = jax.lax.conv_general_dilated(x, p["w"], (stride, stride), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["b"]


def apply_fn(params, x):
    """``x[B, 28, 28, 1] -> logits[B, 10]``."""
    x = jax.nn.relu(conv(x, params["conv1"], 4))  # 7 x 7 x 8
    x = jax.nn.relu(conv(x, params["conv2"], 2))  # 4 x 4 x 16
    x = jax.nn.relu(x.reshape((x.shape[0], -1)) @ params["hidden"]["w"] + params["hidden"]["b"])
    return x @ params["head"]["w"] + params["head"]["b"]


data = load()  # 4,000 training images; 500 held-out test images for the method, 5,000 for the metrics
params0 = init_params(jax.random.key(0))
objective = mu.make_objective(apply_fn, l2=0.0)

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

report(objective, data, forget, original=state.params, result=result, retrained=retrained.params,
       unlearn_runs_s=[result.time_s, *reruns], retrain_s=retrained.time_s)
