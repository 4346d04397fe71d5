"""One adapter from a user's JAX model to what the library works on.

Every algorithm in the library sees a batched ``apply_fn(params, x[B, ...]) -> logits[B, C]``
over a pytree of arrays ``params`` (see :class:`mini_unlearn_jax.core.models.Objective`).
:func:`as_model` turns the usual ways of writing a JAX model into that pair, a :class:`Model`:

- a **flax.linen** module with its parameters (``model.apply({"params": p}, x)``);
- a **flax.nnx** module, which carries its own parameters (its ``nnx.Param`` variables become a
  plain nested dict; everything else, e.g. RNG state or BatchNorm statistics, is frozen into the
  apply function);
- an **equinox** module (its inexact arrays are the parameters, the rest is static; equinox
  models are usually written for one example, so the adapter maps them over the batch);
- a plain function ``apply_fn(params, x)`` with its parameters.

``Model.rebuild(params)`` turns parameters the library returns (e.g. after unlearning) back into
the user's kind of object, and :func:`update_module` writes them into an nnx module in place.

:func:`find_head` finds the parameter group that produces the logits (the "head", which
temperature calibration scales) by probing the model rather than by guessing from dict order,
and :func:`scale_group` scales such a group.

equinox is an optional extra: it is imported only when an equinox model is given (an object
cannot be an ``equinox.Module`` unless equinox has already been imported).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import unfreeze

Params = Any
Array = jax.Array

KINDS = ("linen", "nnx", "equinox", "function")
_SUPPORTED = ("a flax.linen Module (with its params), a flax.nnx Module, an equinox Module, "
              "a function apply_fn(params, x) -> logits (with its params), or a Model")


class Model(NamedTuple):
    """A model as the library sees it.

    Attributes:
      apply_fn: ``(params, x[B, ...]) -> logits[B, C]``, pure and jittable.
      params: the parameters, a pytree of arrays (a plain nested dict for linen and nnx models,
        the parameter partition of the module for equinox, as given for a function).
      rebuild: ``params -> the user's model object carrying these parameters`` (linen and
        function: the params themselves; nnx: a new module with these parameters and the
        original's other state, the original untouched; equinox: the recombined module).
      kind: ``"linen"``, ``"nnx"``, ``"equinox"`` or ``"function"``.
    """

    apply_fn: Callable[[Params, Array], Array]
    params: Params
    rebuild: Callable[[Params], Any]
    kind: str


def _equinox():
    """The equinox module if it has been imported (else no object can be an equinox Module)."""
    return sys.modules.get("equinox")


def model_kind(model: Any) -> str:
    """``"model"`` for a :class:`Model`, else one of :data:`KINDS`.

    Raises:
      TypeError: for anything else, listing the supported kinds.
    """
    if isinstance(model, Model):
        return "model"
    if isinstance(model, nn.Module):
        return "linen"
    if isinstance(model, nnx.Module):
        return "nnx"
    eqx = _equinox()
    if eqx is not None and isinstance(model, eqx.Module):
        return "equinox"
    if callable(model) and not isinstance(model, type):  # a class is not a model
        return "function"
    raise TypeError(f"cannot adapt a {type(model).__name__!r}: give {_SUPPORTED}")


def _per_example(single: Callable[[Params, Array], Array]) -> Callable[[Params, Array], Array]:
    """Batched apply from a per-example one (``x`` without a batch axis)."""
    return lambda params, x: jax.vmap(single, in_axes=(None, 0))(params, x)


def as_model(model: Any, params: Params | None = None, *, batched: bool | None = None) -> Model:
    """Adapt a user's model to a :class:`Model` (a pure batched apply over a parameter pytree).

    Args:
      model: a flax.linen ``Module``, a flax.nnx ``Module``, an equinox ``Module``, a function
        ``apply_fn(params, x) -> logits`` or a :class:`Model` (returned as is).
      params: linen: the ``params`` dict or the variables dict ``{"params": ...}`` (required);
        function: its parameters (required); nnx and equinox: must be None (the module carries
        its parameters).
      batched: whether the model takes a batch ``x[B, ...]`` (True) or one example ``x[...]``
        (False; the adapter then ``vmap``s it). None: False for equinox (whose layers are
        per-example), True for the others.

    Supported and refused:
      - linen: only the ``params`` collection. Variables with other collections (e.g.
        ``batch_stats`` of BatchNorm) are refused: models with mutable state are not supported
        yet. Use a model without BatchNorm, fold the statistics into the preceding layer, or,
        with frozen statistics, pass a function
        ``lambda p, x: model.apply({"params": p, "batch_stats": stats}, x)``.
      - nnx: parameters are the ``nnx.Param`` variables; all other state (RNG streams, BatchNorm
        statistics, plain ``nnx.Variable``) is copied when adapting and carried unchanged, so
        the apply is a pure function of ``(params, x)`` and never mutates the user's module.
        A forward pass that *changes* that state, i.e. a module in training mode (Dropout
        drawing random numbers, BatchNorm updating its statistics), is refused with a
        ``ValueError`` at the first call: put it in evaluation mode first
        (``model.eval()`` or ``nnx.view(model, deterministic=True, use_running_average=True)``).
        BatchNorm in evaluation mode (frozen statistics) is supported.
      - equinox: parameters are ``eqx.partition(model, eqx.is_inexact_array)[0]`` (non-array
        and integer leaves are static). The model must be callable as ``model(x)``: layers that
        need ``key=`` (Dropout: use ``eqx.nn.inference_mode(model)``) or a ``state`` argument
        (BatchNorm) are not supported.
      - function: used as is (``batched=False`` maps it over the batch).

    Raises:
      TypeError: ``model`` is none of the supported kinds.
      ValueError: ``params`` missing or given where it must not be, or refused linen variables.
    """
    kind = model_kind(model)
    if kind == "model":
        if params is not None:
            raise ValueError("a Model already carries its params: use model._replace(params=...)")
        return model
    if kind == "linen":
        return _linen_model(model, params, True if batched is None else batched)
    if kind == "nnx":
        if params is not None:
            raise ValueError(
                "an nnx module carries its own parameters: call as_model(module) without params; "
                "to use other parameters, write them into the module first "
                "(update_module(module, params)) or adapt as_model(module).rebuild(params)")
        return _nnx_model(model, True if batched is None else batched)
    if kind == "equinox":
        if params is not None:
            raise ValueError(
                "an equinox module carries its own parameters: call as_model(module) without "
                "params; to use other parameters, adapt as_model(module).rebuild(params)")
        return _equinox_model(model, False if batched is None else batched)
    if params is None:
        raise ValueError("as_model(apply_fn, params) needs the parameters of the function "
                         "apply_fn(params, x) -> logits")
    fn = model if (batched is None or batched) else _per_example(model)
    return Model(apply_fn=fn, params=params, rebuild=lambda p: p, kind="function")


# -- flax.linen --------------------------------------------------------------------------------
def _linen_model(model: nn.Module, params: Params | None, batched: bool) -> Model:
    name = type(model).__name__
    if params is None:
        raise ValueError(f"as_model({name}(...)) is a flax.linen module and needs its parameters: "
                         "as_model(model, model.init(key, x)['params'])")
    if not isinstance(params, Mapping):
        raise ValueError(f"the params of a flax.linen module are a dict, got {type(params).__name__}")
    if "params" in params:  # the full variables dict
        others = sorted(k for k in params if k != "params")
        if others:
            raise ValueError(
                f"the variables of {name} hold the collections {others} besides 'params': models "
                "with mutable state (e.g. BatchNorm's 'batch_stats') are not supported yet. Use a "
                "model without BatchNorm, fold the statistics into the preceding layer, or, with "
                "frozen statistics, pass a function: as_model(lambda p, x: model.apply("
                "{'params': p, **other_collections}, x), variables['params'])")
        params = params["params"]
    params = unfreeze(params)  # a plain nested dict (a FrozenDict is a leaf-less custom node)

    def single_or_batch(p, x):
        return model.apply({"params": p}, x)

    fn = single_or_batch if batched else _per_example(single_or_batch)
    return Model(apply_fn=fn, params=params, rebuild=lambda p: p, kind="linen")


# -- flax.nnx ----------------------------------------------------------------------------------
def _nnx_params_state(template: nnx.State, params: Params) -> nnx.State:
    """A fresh ``nnx.State`` shaped like ``template`` holding the arrays of the dict ``params``."""
    state = jax.tree.map(lambda v: v, template)  # a new container with new Variable objects
    nnx.replace_by_pure_dict(state, params)  # replaces the Variables inside ``state`` only
    return state


def _nnx_model(model: nnx.Module, batched: bool) -> Model:
    # split a clone: the states' Variables are then not the user's (``nnx.split`` shares them),
    # so later changes to the user's module cannot leak into this closure, and vice versa
    graphdef, param_state, rest_state = nnx.split(nnx.clone(model), nnx.Param, ...)
    params = nnx.to_pure_dict(param_state)
    treedef = jax.tree.structure(params)
    name = type(model).__name__

    def rebuild(p):
        if jax.tree.structure(p) != treedef:
            raise ValueError(f"params do not match the parameters of {name}: expected the "
                             f"structure {treedef}, got {jax.tree.structure(p)}")
        # copy=True: new Variable objects, so that nothing done to the result reaches the templates
        return nnx.merge(graphdef, _nnx_params_state(param_state, p), rest_state, copy=True)

    def single_or_batch(p, x):
        module = rebuild(p)
        before = jax.tree.leaves(nnx.state(module))
        out = module(x)
        after = jax.tree.leaves(nnx.state(module))
        if len(before) != len(after) or any(a is not b for a, b in zip(before, after, strict=True)):
            raise ValueError(
                f"a forward pass of the nnx module {name} changed its state (Dropout drawing random "
                "numbers or BatchNorm updating its statistics, i.e. training mode): the library needs "
                "a pure function of (params, x). Put the module in evaluation mode first: "
                "model.eval() or nnx.view(model, deterministic=True, use_running_average=True)")
        return out

    fn = single_or_batch if batched else _per_example(single_or_batch)
    return Model(apply_fn=fn, params=params, rebuild=rebuild, kind="nnx")


def update_module(module: nnx.Module, params: Params) -> nnx.Module:
    """Write ``params`` (a dict like ``as_model(module).params``) into the nnx ``module`` in place.

    The module keeps its Variable objects (references to them, e.g. held by an ``nnx.Optimizer``,
    stay valid); only their values change, and non-parameter state is left alone. This is the
    in-place counterpart of ``as_model(module).rebuild(params)``, which returns a new module.

    Returns:
      ``module`` itself.
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"update_module updates a flax.nnx Module in place, got "
                        f"{type(module).__name__}; for other kinds use as_model(model).rebuild(params)")
    nnx.update(module, _nnx_params_state(nnx.state(module, nnx.Param), params))
    return module


# -- equinox -----------------------------------------------------------------------------------
def _equinox_model(model: Any, batched: bool) -> Model:
    import equinox as eqx

    params, static = eqx.partition(model, eqx.is_inexact_array)

    def rebuild(p):
        return eqx.combine(p, static)

    def single_or_batch(p, x):
        return eqx.combine(p, static)(x)

    fn = single_or_batch if batched else _per_example(single_or_batch)
    return Model(apply_fn=fn, params=params, rebuild=rebuild, kind="equinox")


def weight_mask(params: Params) -> Params:
    """L2 mask penalizing every leaf named ``kernel`` (flax) or ``weight`` (equinox), not biases.

    :func:`mini_unlearn_jax.core.models.make_objective` uses it for equinox models in place of the
    default ``kernel_mask``, which would select nothing there (equinox names its kernels
    ``weight``) and so silently drop the L2 term.
    """

    def is_weight(path, _):
        return _entry(path[-1]) in ("kernel", "weight")

    return jax.tree_util.tree_map_with_path(is_weight, params)


# -- the head ----------------------------------------------------------------------------------
def _entry(key) -> str:
    """A key-path entry as a string: a dict key, an attribute name or a sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _normalise(path) -> tuple[str, ...]:
    if isinstance(path, str):
        return (path,)
    return tuple(_entry(k) for k in path)  # strings, ints or jax key-path entries


def _is_float(leaf) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)


def scale_group(params: Params, path, t) -> Params:
    """``params`` with every floating-point leaf under ``path`` multiplied by ``t`` (dtypes kept).

    Args:
      params: a pytree (nested dicts, an equinox module, ...).
      path: a tuple of key-path entries as :func:`find_head` returns them (dict keys, attribute
        names or indices, compared as strings), or one top-level key as a string; ``()`` is
        the whole tree.
      t: the factor (a Python number or a scalar array, e.g. a fitted temperature).

    Raises:
      ValueError: no floating-point leaf lies under ``path``.
    """
    prefix = _normalise(path)
    found = []

    def scale(kp, leaf):
        if _is_float(leaf) and tuple(_entry(k) for k in kp)[: len(prefix)] == prefix:
            found.append(True)
            return (leaf * t).astype(leaf.dtype)
        return leaf

    out = jax.tree_util.tree_map_with_path(scale, params)
    if not found:
        raise ValueError(f"no parameter lies under {prefix}")
    return out


def _groups(params: Params) -> list[tuple[str, ...]]:
    """Parent paths of the floating-point leaves, in flatten order of their first leaf."""
    groups: dict[tuple[str, ...], None] = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if _is_float(leaf):
            groups.setdefault(tuple(_entry(k) for k in kp[:-1]), None)
    return list(groups)


def _generic_point(params: Params, seed: int = 0) -> Params:
    """``params`` with 10% relative Gaussian noise on every floating-point leaf (0.1 absolute on an
    all-zero leaf, e.g. a freshly initialized bias), so that no bias is exactly zero."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    out = []
    for key, leaf in zip(keys, leaves, strict=False):
        if _is_float(leaf) and leaf.size:
            rms = float(jnp.sqrt(jnp.mean(jnp.square(leaf.astype(jnp.float32)))))
            std = 0.1 * rms if rms > 0 else 0.1
            noise = std * jax.random.normal(key, leaf.shape, jnp.float32)
            leaf = (leaf.astype(jnp.float32) + noise).astype(leaf.dtype)
        out.append(leaf)
    return jax.tree.unflatten(treedef, out)


def find_head(apply_fn: Callable[[Params, Array], Array], params: Params, x: Array, *,
              t: float = 2.0, rtol: float = 1e-4) -> tuple[str, ...]:
    """The path of the parameter group that produces the logits, found by probing the model.

    The candidates are the groups of floating-point leaves sharing a parent node (a layer's
    kernel and bias). A group is the head when multiplying its leaves by ``t`` and by ``-t``
    multiplies the logits by ``t`` and ``-t`` on the probe batch ``x[:16]`` (to ``rtol`` relative
    to the largest logit): the logits are linear in the head's parameters, which is what
    temperature scaling of the head relies on, whatever the order of the params dict. With the
    default ``t = 2`` the scaling of a linear head is exact in any binary float format.

    Two things keep other groups out. The factor ``-t``: a layer followed by a ReLU (or any
    positively homogeneous activation) scales the logits by ``t`` when its biases downstream are
    zero, but not by ``-t``. And the probe runs at a generic point near ``params`` (10% relative
    noise on every leaf, so no bias is exactly zero, as it is at flax's initialization): an affine
    layer right before the head, e.g. a LayerNorm, scales zero-bias logits linearly too, but not
    once the head has a bias. What can still qualify besides the head is a chain of bias-free
    linear layers in front of a bias-free head (every group then scales the logits alike); groups
    are tried from the last in flatten order backwards and the first that qualifies is returned,
    i.e. the last one in flatten order.

    Costs one forward pass plus one or two per group tried (``apply_fn`` is jitted once; call this
    outside ``jit``, it reads the results on the host).

    Args:
      apply_fn: ``(params, x[B, ...]) -> logits[B, C]``.
      params: the parameters (nested dicts or an equinox module pytree).
      x: a probe batch (at most its first 16 examples are used).
      t: the probe factor (a power of two keeps the check exact).
      rtol: relative tolerance of the check.

    Returns:
      The head's path as strings, usable with :func:`scale_group` (``("Dense_1",)`` for a linen
      MLP, ``("classifier",)`` for an attribute named so).

    Raises:
      ValueError: the logits on the probe batch are zero or not finite, or no group qualifies.
    """
    fn = jax.jit(apply_fn)
    x = jnp.asarray(x)[:16]
    probe = _generic_point(params)
    base = np.asarray(fn(probe, x), dtype=np.float64)
    largest = float(np.max(np.abs(base))) if base.size else 0.0
    if not np.isfinite(base).all() or largest == 0.0:
        raise ValueError("the head could not be found: the logits on the probe batch are zero or "
                         "not finite; name it explicitly, head=(\"Dense_1\",) style")

    def scales(path, factor):
        out = np.asarray(fn(scale_group(probe, path, factor), x), dtype=np.float64)
        return np.max(np.abs(out - factor * base)) <= rtol * abs(factor) * largest

    groups = _groups(params)
    for path in reversed(groups):
        if scales(path, -t) and scales(path, t):
            return path
    raise ValueError(f"the head could not be found: scaling none of the parameter groups {groups} "
                     f"by {t} scales the logits by {t}; name it explicitly, head=(\"Dense_1\",) style")
