"""Models and the per-example objective that every algorithm in the library works on.

The library never looks inside a model: it sees an :class:`Objective`, i.e. a
batched ``apply_fn(params, x) -> logits``, a per-example ``example_loss(logits, y)``
and an L2 coefficient with a mask that says which parameter leaves it penalizes.
A user's own flax model and loss plug in through :func:`make_objective` or by
building an :class:`Objective` directly.

With ``n`` training examples the objective is ``F(w) = (1/n) sum_i l_i(w) + l2/2 ||M w||^2``
(``M`` the mask); for :class:`LogisticRegression` with the default mask (kernel only,
bias unpenalized) this is scikit-learn's ``LogisticRegression(C=1/(l2*n))`` objective
for three or more classes, divided by ``n``.

``make_objective(model, l2, penalize_bias=True)`` penalizes every parameter: with a convex
per-example loss on a linear model the objective is then ``l2``-strongly convex in all
parameters, which is what makes the certificate of :mod:`mini_unlearn_jax.core.certificate` a bound.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Params = Any
Array = jax.Array


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: ``logits = x W + b`` on flattened inputs."""

    num_classes: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros)(x)


class MLP(nn.Module):
    """Two-layer perceptron: Dense(hidden) -> ReLU -> Dense(num_classes)."""

    num_classes: int
    hidden: int = 256

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


def _same_padding(size: int, k: int, s: int) -> tuple[tuple[int, int], int]:
    """``SAME`` padding as XLA pads it (low, high) and the output size, for one spatial axis."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return (total // 2, total - total // 2), out


def _patches(x: Array, k: int, s: int) -> Array:
    """``[B, H', W', k*k*C]``: the ``k*k`` shifted views of the ``SAME``-padded input, stacked
    on the channel axis in the kernel's ``(row, column, channel)`` order."""
    (ph, ho), (pw, wo) = _same_padding(x.shape[1], k, s), _same_padding(x.shape[2], k, s)
    xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
    views = [xp[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :] for i in range(k) for j in range(k)]
    return jnp.concatenate(views, axis=-1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def patch_conv(x: Array, kernel: Array, strides: int) -> Array:
    """``SAME`` convolution of ``x [B, H, W, C]`` with ``kernel [k, k, C, F]`` (odd ``k``): XLA's
    own convolution forward, and derivatives through image patches (see :class:`PatchConv`)."""
    k = kernel.shape[0]
    pads = [_same_padding(x.shape[1], k, strides)[0], _same_padding(x.shape[2], k, strides)[0]]
    return jax.lax.conv_general_dilated(x, kernel, (strides, strides), pads,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@patch_conv.defjvp
def _patch_conv_jvp(strides, primals, tangents):
    # conv(x, K) = patches(x) @ K as a matrix, so its tangent is
    # patches(dx) @ K + patches(x) @ dK: slices and matrix products, whose transposes (the
    # reverse-mode gradient) are slice-adds and matrix products again
    x, kernel = primals
    dx, dkernel = tangents
    k, f = kernel.shape[0], kernel.shape[-1]
    mat = lambda a: a.reshape(-1, f)
    y = patch_conv(x, kernel, strides)
    return y, _patches(dx, k, strides) @ mat(kernel) + _patches(x, k, strides) @ mat(dkernel)


class PatchConv(nn.Module):
    """A ``k x k`` convolution (odd ``k``, ``SAME`` padding, ``strides``) whose derivatives go
    through image patches: the ``k*k`` shifted views of the padded input stacked on the channel
    axis (``[B, H', W', k*k*C]``) times the kernel as a ``[k*k*C, features]`` matrix. The
    forward pass is XLA's convolution, so it computes what ``nn.Conv(features, (k, k), strides,
    padding="SAME")`` computes, with the same parameters (``kernel [k, k, C, features]``,
    ``bias``); its gradient is slice-adds and matrix products. XLA:CPU runs the native
    convolution's gradient inside a compiled training loop (``lax.scan``) about 20 times slower
    (``benchmarks/conv_in_scan.py``). Forward and reverse mode, and their compositions
    (Hessian-vector products), all work."""

    features: int
    kernel_size: int = 3
    strides: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        if k % 2 != 1:
            raise ValueError(f"PatchConv takes an odd kernel size, got {k}")
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return patch_conv(x, kernel, self.strides) + bias


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection: ``relu(x + conv(relu(conv(x))))``."""

    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.relu(PatchConv(self.features)(x))
        return nn.relu(x + PatchConv(self.features)(h))


class ResidualCNN(nn.Module):
    """A small residual CNN for square single-channel images given as flat rows ``[B, s*s]``
    (or ``[B, s, s]`` / ``[B, s, s, 1]``).

    A strided 3x3 convolution to ``width`` channels (``s/2``), a :class:`ResidualBlock`, a
    strided convolution to ``2 * width`` channels (``s/4``), another block and a linear head on
    the flattened features (``params["Dense_0"]``): 43,626 parameters for 28x28 images at
    ``width=16``, enough to fit a few thousand images almost exactly (a model that leaks
    membership, as the unlearning benchmarks need). No
    normalisation layers: the parameters are the model's whole state, as the library's pure
    functions expect. The convolutions are :class:`PatchConv`."""

    num_classes: int
    width: int = 16

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.size // x.shape[0]
        side = int(round(d ** 0.5))
        if side * side != d:
            raise ValueError(f"ResidualCNN takes square single-channel images; got rows of {d} values, which is not "
                             "a square number: for tabular data use logreg or mlp")
        x = x.reshape((x.shape[0], side, side, 1))
        x = nn.relu(PatchConv(self.width, strides=2)(x))
        x = ResidualBlock(self.width)(x)
        x = nn.relu(PatchConv(2 * self.width, strides=2)(x))
        x = ResidualBlock(2 * self.width)(x)
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def cross_entropy(logits: Array, label: Array) -> Array:
    """Per-example softmax cross-entropy with an integer label (``logits`` has shape [C])."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, label)


def squared_error(prediction: Array, target: Array) -> Array:
    """Per-example squared error ``0.5 * ||prediction - target||^2`` (``prediction`` has shape [C];
    with one output and a scalar target this is the least-squares loss of ridge regression)."""
    return 0.5 * jnp.sum(jnp.square(prediction - target))


def kernel_mask(params: Params) -> Params:
    """The default L2 mask: penalize every leaf named ``kernel``, leave biases free."""

    def is_kernel(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", str(last)))
        return name == "kernel"

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def all_params_mask(params: Params) -> Params:
    """The L2 mask of ``penalize_bias=True``: penalize every leaf, biases included."""
    return jax.tree.map(lambda _: True, params)


@dataclasses.dataclass(frozen=True)
class Objective:
    """A regularized empirical-risk objective over per-example losses.

    Attributes:
      apply_fn: ``(params, x[B, ...]) -> logits[B, C]``.
      example_loss: ``(logits[C], y[]) -> scalar`` loss of one example.
      l2: coefficient of ``l2/2 * ||mask * params||^2``.
      l2_mask: ``params -> pytree of bools`` selecting the penalized leaves.
      kind: ``"logreg"`` when the model is a single dense layer on the raw inputs
        (unlocks exact closed-form curvature), anything else otherwise.
      canonicalize: optional ``params -> params`` mapping to a canonical representative of a
        set of parameters with identical outputs and objective (softmax regression: the
        unpenalized bias is defined only up to a constant shift, so it is centred). Training
        applies it to the final parameters so that parameter distances are meaningful.
      convex: the objective is convex in the parameters (declared by its maker; logistic
        regression always is). The contraction-mapping fixed point and Newton apply only to
        convex objectives; a network is unlearned along its trajectory instead.

    The losses are computed on logits of at least float32 (:meth:`logits`): a model that
    computes in bfloat16 inside ``apply_fn`` gets its loss, gradients' reduction and the
    library's statistics in float32.
    """

    apply_fn: Callable[[Params, Array], Array]
    example_loss: Callable[[Array, Array], Array] = cross_entropy
    l2: float = 0.0
    l2_mask: Callable[[Params], Params] = kernel_mask
    kind: str = "generic"
    canonicalize: Callable[[Params], Params] | None = None
    convex: bool = False

    @property
    def is_convex(self) -> bool:
        """Whether the objective is known to be convex (declared, or logistic regression)."""
        return self.convex or self.kind == "logreg"

    def logits(self, params: Params, x: Array) -> Array:
        """``apply_fn(params, x)`` upcast to at least float32 (bfloat16 compute stays inside the model)."""
        out = self.apply_fn(params, x)
        return out.astype(jnp.promote_types(out.dtype, jnp.float32))

    # -- per example ---------------------------------------------------------
    def loss_one(self, params: Params, x: Array, y: Array) -> Array:
        """Loss of a single example (``x`` without a batch axis)."""
        return self.example_loss(self.logits(params, x[None])[0], y)

    def example_grads(self, params: Params, x: Array, y: Array) -> Params:
        """Per-example gradients ``[B, ...]`` via ``vmap(grad(loss_one))``."""
        return jax.vmap(jax.grad(self.loss_one), in_axes=(None, 0, 0))(params, x, y)

    # -- batched ---------------------------------------------------------------
    def losses(self, params: Params, x: Array, y: Array) -> Array:
        """Per-example losses ``[B]`` from one batched forward pass."""
        return jax.vmap(self.example_loss)(self.logits(params, x), y)

    def data_loss(self, params: Params, x: Array, y: Array, weights: Array | None = None) -> Array:
        """Weighted mean loss ``sum w_i l_i / sum w_i`` (plain mean when ``weights`` is None)."""
        losses = self.losses(params, x, y)
        if weights is None:
            return jnp.mean(losses)
        return jnp.sum(weights * losses) / jnp.maximum(jnp.sum(weights), 1.0)

    def penalty(self, params: Params) -> Array:
        mask = self.l2_mask(params)
        sq = jax.tree.map(lambda p, m: jnp.sum(p * p) if m else jnp.zeros((), p.dtype), params, mask)
        return 0.5 * self.l2 * sum(jax.tree.leaves(sq))

    def penalty_grad(self, params: Params) -> Params:
        mask = self.l2_mask(params)
        return jax.tree.map(lambda p, m: self.l2 * p if m else jnp.zeros_like(p), params, mask)

    def value(self, params: Params, x: Array, y: Array, weights: Array | None = None) -> Array:
        return self.data_loss(params, x, y, weights) + self.penalty(params)


@dataclasses.dataclass(frozen=True, eq=False)
class LinenApply:
    """``apply_fn`` of a flax.linen module: ``module.apply({"params": params}, x)``.

    Equal hashable modules give equal (and equally hashed) functions, so two objectives made from
    the same model are equal and share every compiled program keyed on the objective (another seed
    of the same model in the grid harness or the benchmark protocol compiles nothing new). A module
    with an unhashable attribute (a list of layer widths, say) is compared by identity instead."""

    module: nn.Module

    def __call__(self, params: Params, x: Array) -> Array:
        return self.module.apply({"params": params}, x)

    def _key(self):
        try:
            hash(self.module)
        except TypeError:  # flax cannot hash a module holding a list or a dict
            return id(self.module)
        return self.module

    def __eq__(self, other) -> bool:
        if not isinstance(other, LinenApply):
            return NotImplemented
        return self.module is other.module or self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


def make_objective(model: Any, l2: float, *, example_loss=cross_entropy, l2_mask=kernel_mask,
                   penalize_bias: bool = False, convex: bool = False) -> Objective:
    """Wrap a model into an :class:`Objective`.

    A flax.linen module is called as ``model.apply({'params': p}, x)`` (and
    :class:`LogisticRegression` is recognised as ``kind="logreg"``). Any other model goes through
    :func:`mini_unlearn_jax.core.adapters.as_model`: an adapter ``Model``, a flax.nnx or equinox
    module (the objective's parameters are then ``as_model(model).params``: pass the adapter and
    train from its ``params``), or a batched function ``apply_fn(params, x) -> logits`` used as
    is. An nnx module is not mutated; train results go back with ``rebuild`` or ``update_module``.

    Args:
      model: a flax.linen module, an adapter ``Model``, a flax.nnx or equinox module, or a
        function ``apply_fn(params, x[B, ...]) -> logits[B, C]``.
      l2: the L2 coefficient.
      example_loss: ``(logits[C], y[]) -> scalar``.
      l2_mask: which leaves the L2 term penalizes (default: kernels only, biases free; for an
        equinox model, whose kernels are named ``weight``, the default is
        :func:`mini_unlearn_jax.core.adapters.weight_mask`, the same selection).
      penalize_bias: penalize every parameter, biases included (``l2_mask=all_params_mask``).
        With ``l2 > 0``, a linear model and a convex loss the objective is ``l2``-strongly convex
        in all parameters, so :func:`mini_unlearn_jax.core.certificate.certify` gives a bound. The
        softmax bias is then determined by the objective and is not re-centred.
      convex: declare the objective convex in its parameters (a linear model with a convex loss),
        which admits the convex-only solvers (the fixed point, Newton); logistic regression
        (:class:`LogisticRegression`) is known to be. Never declare a network convex: its fixed
        point is the trained model.
    """
    if penalize_bias:
        if l2_mask is not kernel_mask:
            raise ValueError("give either penalize_bias=True or an l2_mask, not both")
        l2_mask = all_params_mask
    is_logreg = isinstance(model, LogisticRegression)

    if isinstance(model, nn.Module):
        apply_fn = LinenApply(model)
    else:  # imported here: the adapters pull in flax.nnx (and equinox for equinox models)
        from .adapters import as_model, model_kind, weight_mask

        kind = model_kind(model)  # TypeError naming the supported kinds for anything else
        adapter = None if kind == "function" else as_model(model)
        apply_fn = model if adapter is None else adapter.apply_fn
        if adapter is not None and adapter.kind == "equinox" and l2_mask is kernel_mask:
            l2_mask = weight_mask

    # centring the softmax bias leaves the objective unchanged only while the bias is unpenalized
    centre = is_logreg and example_loss is cross_entropy and l2_mask is not all_params_mask
    return Objective(apply_fn=apply_fn, example_loss=example_loss, l2=float(l2), l2_mask=l2_mask,
                     kind="logreg" if is_logreg else "generic",
                     canonicalize=center_softmax_bias if centre else None, convex=bool(convex))


LOW_PRECISION = ("bfloat16", "float16")


def check_param_dtypes(params: Params, what: str = "the parameters") -> None:
    """Refuse bfloat16 / float16 parameters up front (ValueError saying what to do).

    The library's buffers, curvature statistics, fixed point and optimizer steps accumulate in
    the parameters' dtype, where 8 significant bits lose the updates of a late training step.
    Keep float32 parameters and compute in bfloat16 inside the model (cast the parameters and
    inputs in ``apply_fn``): the logits are upcast before the loss (:meth:`Objective.logits`)."""
    low = sorted({str(jnp.result_type(a)) for a in jax.tree.leaves(params)} & set(LOW_PRECISION))
    if low:
        raise ValueError(f"{what} are {', '.join(low)}: keep float32 (or float64) parameters and compute in "
                         "bfloat16 inside your model, e.g. apply_fn = lambda p, x: model.apply({'params': "
                         "jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)}, x.astype(jnp.bfloat16))")


def center_softmax_bias(params: Params) -> Params:
    """Shift the output bias to mean zero (softmax outputs and the objective are unchanged)."""
    dense = params["Dense_0"]
    return {**params, "Dense_0": {**dense, "bias": dense["bias"] - jnp.mean(dense["bias"])}}


#: The models :func:`build_model` builds by name (the CLI's ``train --model`` choices).
BUILTIN_MODELS = ("logreg", "mlp", "cnn")


def build_model(name: str, num_classes: int, *, hidden: int = 256) -> nn.Module:
    """Model by CLI name: ``logreg``, ``mlp`` (``hidden`` units) or ``cnn`` (:class:`ResidualCNN`
    of width 16, for square images; ``hidden`` does not apply)."""
    if name == "logreg":
        return LogisticRegression(num_classes=num_classes)
    if name == "mlp":
        if hidden < 1:
            raise ValueError(f"--hidden must be a positive integer, got {hidden}")
        return MLP(num_classes=num_classes, hidden=hidden)
    if name == "cnn":
        return ResidualCNN(num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}: choose one of {', '.join(BUILTIN_MODELS)}")


def init_params(model: nn.Module, x_example: Array, seed: int, dtype=None) -> Params:
    """Initialize parameters from ``seed`` for inputs shaped like ``x_example`` (one example), in
    ``dtype`` if given (else the module's parameter dtype, float32 for the bundled models)."""
    params = model.init(jax.random.key(seed), jnp.asarray(x_example)[None])["params"]
    if dtype is not None:
        params = jax.tree.map(lambda a: a.astype(dtype), params)
    return params
