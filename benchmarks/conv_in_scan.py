"""Why `ResidualCNN` uses `PatchConv`: the time of one Adam step of the same residual CNN with
flax's native `nn.Conv` and with `PatchConv`, called step by step (one jitted step per call) and
inside one compiled `lax.scan` over the steps, as every training loop of the library runs.

    python benchmarks/conv_in_scan.py [--steps 20] [--batch 128]

Prints one line per (convolution, loop) with milliseconds per step (compilation apart).
"""

from __future__ import annotations

import argparse
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mini_unlearn_jax.core import models


def cnn(conv):
    class Block(nn.Module):
        features: int

        @nn.compact
        def __call__(self, x):
            h = nn.relu(conv(self.features, 1)(x))
            return nn.relu(x + conv(self.features, 1)(h))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x.reshape((x.shape[0], 28, 28, 1))
            x = Block(16)(nn.relu(conv(16, 2)(x)))
            x = Block(32)(nn.relu(conv(32, 2)(x)))
            return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))

    return Net()


CONVS = {
    "nn.Conv": lambda f, s: nn.Conv(f, (3, 3), strides=s, padding="SAME"),
    "PatchConv": lambda f, s: models.PatchConv(f, 3, s),
}


def _adam_step(net, opt, p, s, xb, yb):
    loss = lambda q: optax.softmax_cross_entropy_with_integer_labels(net.apply({"params": q}, xb), yb).mean()
    u, s = opt.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s


def _scan(step, batch, steps, p, s):
    body = lambda c, t: (step(*c, *batch(t)), None)
    return jax.lax.scan(body, (p, s), jnp.arange(steps))[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((args.steps * args.batch, 784), np.float32))
    y = jnp.asarray(rng.integers(0, 10, args.steps * args.batch))
    opt = optax.adam(1e-3)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; batch {args.batch}, {args.steps} steps")
    def batch(t):
        return (jax.lax.dynamic_slice_in_dim(x, t * args.batch, args.batch),
                jax.lax.dynamic_slice_in_dim(y, t * args.batch, args.batch))

    for name, conv in CONVS.items():
        net = cnn(conv)
        params = net.init(jax.random.key(0), x[:1])["params"]
        step = functools.partial(_adam_step, net, opt)
        one = jax.jit(step)
        scan = jax.jit(functools.partial(_scan, step, batch, args.steps))
        state = (params, opt.init(params))
        jax.block_until_ready(one(*state, *batch(0)))
        t0 = time.perf_counter()
        out = state
        for t in range(args.steps):
            out = one(*out, *batch(t))
        jax.block_until_ready(out)
        per_call = (time.perf_counter() - t0) / args.steps
        jax.block_until_ready(scan(*state))
        t0 = time.perf_counter()
        jax.block_until_ready(scan(*state))
        in_scan = (time.perf_counter() - t0) / args.steps
        print(f"{name:10s} step by step {per_call * 1e3:7.1f} ms/step   inside lax.scan {in_scan * 1e3:7.1f} ms/step")


if __name__ == "__main__":
    main()
