"""The snapshot buffer: a fixed-shape pytree of K (step, params, full-data gradient) snapshots.

It is an optax-style pair of pure functions, :class:`SnapshotBuffer` ``(init, update)``,
threaded through the training loop next to the optimizer state. Its memory is
``K * 2 * |w|`` numbers, against ``T * 2 * |w|`` for a method that caches every step.

Selection policy: a ring buffer over the steps ``t`` with ``t % every == 0`` (and any step
written with ``force=True``, which the trainer uses for the final parameters), keeping
the newest ``K``. Slot order is by write count; :func:`ordered` returns oldest to newest.

The contract, for a training loop of your own (what the solver assumes):

1. The gradient stored with ``w_t`` is that of the *data term* over the *whole training set*
   (the weighted mean loss, no L2 penalty): ``jax.grad(objective.data_loss)(w_t, x, y)``.
   :func:`data_grad_fn` builds it. Passing the full objective's gradient (with L2) silently
   degrades the result (the penalty would be counted twice).
2. Pass that gradient as a *function* ``grad_fn(params)``: ``update`` calls it only on the
   steps it records (inside ``lax.cond``), so a loop that calls ``update`` every step pays for
   the full-data gradient ``K`` times, not ``T`` times. Passing arrays works too, but then you
   compute them every step.
3. Write the final parameters with ``force=True`` (the newest entry must be ``w*``; the
   solver checks it and refuses a stale buffer). Writing a step that is already the newest
   entry replaces that entry, so the final write never wastes a slot on a duplicate.

``update`` checks at trace time that the gradient has the parameters' tree structure and shapes.

The second policy, for non-convex training (:func:`trajectory_buffer`): ``K`` parameter
snapshots at a fixed log-spaced schedule of steps (:func:`log_schedule`), so the early part of
training survives at a fixed ``K``; trajectory unlearning rewinds along it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Params = Any


class SnapshotState(NamedTuple):
    """``steps[K]`` (-1 where empty), ``params`` and ``grads`` with leaves ``[K, ...]``,
    ``count`` = number of snapshots written so far."""

    steps: jax.Array
    params: Params
    grads: Params
    count: jax.Array


class SnapshotBuffer(NamedTuple):
    init: Callable[[Params], SnapshotState]
    update: Callable[..., SnapshotState]


def snapshot_buffer(size: int, every: int = 1) -> SnapshotBuffer:
    """A ring buffer of the newest ``size`` snapshots taken every ``every`` steps."""
    if size < 1:
        raise ValueError(f"snapshot buffer size must be >= 1, got {size}")
    if every < 1:
        raise ValueError(f"snapshot interval must be >= 1, got {every}")

    def init(params: Params) -> SnapshotState:
        zeros = jax.tree.map(lambda p: jnp.zeros((size,) + jnp.shape(p), jnp.result_type(p)), params)
        return SnapshotState(
            steps=jnp.full((size,), -1, jnp.int32),
            params=zeros,
            grads=jax.tree.map(jnp.copy, zeros),
            count=jnp.zeros((), jnp.int32),
        )

    def update(state: SnapshotState, step, params: Params, grads, force=False) -> SnapshotState:
        """Record ``(step, params, grads)`` when ``step % every == 0`` or ``force``.

        ``grads``: the data term's full-data gradient at ``params`` as a pytree, or a function
        ``grads(params)`` that is evaluated only when the snapshot is taken (the cheap use)."""
        take = jnp.logical_or(jnp.asarray(step) % every == 0, force)

        def write(s: SnapshotState) -> SnapshotState:
            # a function of the parameters, unless it is itself a pytree of arrays (an equinox
            # module is callable and is also the gradient of an equinox model)
            is_fn = callable(grads) and not any(isinstance(a, jax.Array | np.ndarray) for a in jax.tree.leaves(grads))
            g = grads(params) if is_fn else grads
            if jax.tree.structure(g) != jax.tree.structure(params) or any(
                    jnp.shape(a) != jnp.shape(b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(params), strict=True)):
                raise ValueError("snapshot_buffer.update: the gradient must have the parameters' tree structure and "
                                 f"shapes (got {jax.tree.structure(g)} for parameters {jax.tree.structure(params)}); "
                                 "pass grad(objective.data_loss) at params, or data_grad_fn(objective, x, y)")
            # a second write of the newest entry's step (a final force=True on a step the schedule
            # already took) replaces that entry instead of filling a slot with a duplicate
            again = (s.count > 0) & (s.steps[(s.count - 1) % size] == jnp.asarray(step, jnp.int32))
            slot = jnp.where(again, (s.count - 1) % size, s.count % size)
            put = lambda buf, v: buf.at[slot].set(v.astype(buf.dtype))
            return SnapshotState(
                steps=s.steps.at[slot].set(jnp.asarray(step, jnp.int32)),
                params=jax.tree.map(put, s.params, params),
                grads=jax.tree.map(put, s.grads, g),
                count=jnp.where(again, s.count, s.count + 1),
            )

        return jax.lax.cond(take, write, lambda s: s, state)

    return SnapshotBuffer(init, update)


def data_grad_fn(objective, x, y, weights=None) -> Callable[[Params], Params]:
    """``params -> grad of objective.data_loss over (x, y)``: the gradient the buffer stores
    (data term only, whole training set; ``weights`` the 0/1 keep mask if any)."""
    return lambda params: jax.grad(objective.data_loss)(params, x, y, weights)


def ordered(state: SnapshotState) -> SnapshotState:
    """The filled snapshots, oldest first (drops empty slots; not jittable when partly full)."""
    size = state.steps.shape[0]
    count = int(state.count)
    n = min(count, size)
    idx = jnp.array([(count - n + i) % size for i in range(n)], jnp.int32)
    take = lambda a: a[idx]
    return SnapshotState(state.steps[idx], jax.tree.map(take, state.params), jax.tree.map(take, state.grads), jnp.asarray(n))


def latest(state: SnapshotState) -> tuple[Params, Params]:
    """Params and gradient of the newest snapshot."""
    slot = (state.count - 1) % state.steps.shape[0]
    return jax.tree.map(lambda a: a[slot], state.params), jax.tree.map(lambda a: a[slot], state.grads)


def nbytes(tree) -> int:
    """Bytes held by the arrays of a pytree."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


# -- the trajectory buffer (log-spaced parameter snapshots) ------------------------------------


def log_schedule(total_steps: int, size: int, *, first: int = 1) -> tuple[int, ...]:
    """``size`` distinct steps ``0 = s_0 < s_1 < ... < s_{K-1} = total_steps``, geometric from ``first``.

    Rounding collisions are pushed up to the next free step, so the early steps stay dense.
    """
    if size < 2:
        raise ValueError(f"a log schedule needs size >= 2 (step 0 and the last step), got {size}")
    if first < 1 or total_steps < max(first, size - 1):
        raise ValueError(f"cannot place {size} distinct steps from {first} to {total_steps}")
    ratio = (total_steps / first) ** (1.0 / max(size - 2, 1))
    raw = [0] + [int(round(first * ratio**i)) for i in range(size - 1)]
    raw[-1] = total_steps
    out = [0]
    for i, s in enumerate(raw[1:], start=1):
        out.append(min(max(s, out[-1] + 1), total_steps - (size - 1 - i)))
    return tuple(out)


class TrajectoryState(NamedTuple):
    """The buffer: ``steps[K]`` (-1 where not written yet), ``params`` with leaves ``[K, ...]`` and
    ``opt_state`` (leaves ``[K, ...]``, or ``()`` when the buffer keeps no optimizer state)."""

    steps: jax.Array
    params: Params
    opt_state: Any


class TrajectoryBuffer(NamedTuple):
    """``init(params, opt_state=None)`` and ``update(state, step, params, opt_state=None)``, pure."""

    init: Callable[..., TrajectoryState]
    update: Callable[..., TrajectoryState]
    schedule: tuple[int, ...]


def trajectory_buffer(schedule, *, with_opt_state: bool = False) -> TrajectoryBuffer:
    """A buffer that keeps ``w_t`` (and the optimizer state at ``t``) for ``t`` in ``schedule``.

    Slot ``i`` holds step ``schedule[i]``; ``update`` at any other step returns the state
    unchanged (a ``lax.cond``), so it can run at every step of a ``lax.scan``. ``init(w0)``
    records the initial parameters as step 0 when the schedule starts there (the rewind target
    of last resort). In your own loop::

        buf = trajectory_buffer(log_schedule(T, 12))
        traj = buf.init(params, opt_state)          # slot 0: w0
        for t in range(T):                          # or inside jax.lax.scan
            params, opt_state = my_step(params, opt_state, batch(t))
            traj = buf.update(traj, t + 1, params, opt_state)  # w after step t + 1

    Memory: ``K * |w|`` numbers (``3 K |w|`` with Adam's state).
    """
    sched = tuple(int(s) for s in schedule)
    if not sched or sched[0] < 0 or any(b <= a for a, b in zip(sched, sched[1:], strict=False)):
        raise ValueError(f"schedule must be strictly increasing non-negative steps, got {sched}")
    K = len(sched)
    table = np.asarray(sched, np.int32)

    def init(params: Params, opt_state: Any = None) -> TrajectoryState:
        stack = lambda a: jnp.zeros((K,) + jnp.shape(a), jnp.result_type(a))
        opt = jax.tree.map(stack, opt_state) if with_opt_state else ()
        empty = TrajectoryState(jnp.full((K,), -1, jnp.int32), jax.tree.map(stack, params), opt)
        return update(empty, 0, params, opt_state) if sched[0] == 0 else empty

    def update(state: TrajectoryState, step, params: Params, opt_state: Any = None) -> TrajectoryState:
        step = jnp.asarray(step, jnp.int32)
        slot = jnp.clip(jnp.searchsorted(jnp.asarray(table), step), 0, K - 1)
        hit = jnp.asarray(table)[slot] == step

        def write(s: TrajectoryState) -> TrajectoryState:
            put = lambda buf, v: buf.at[slot].set(jnp.asarray(v).astype(buf.dtype))
            opt = jax.tree.map(put, s.opt_state, opt_state) if with_opt_state else ()
            return TrajectoryState(s.steps.at[slot].set(step), jax.tree.map(put, s.params, params), opt)

        return jax.lax.cond(hit, write, lambda s: s, state)

    return TrajectoryBuffer(init, update, sched)
