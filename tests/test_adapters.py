"""The model adapter: linen, nnx, equinox and plain-function CNNs seen as ``(apply_fn, params)``.

Each kind gets the same small CNN on scikit-learn's 8x8 digits (conv 3x3 with 4 channels ->
ReLU -> 2x2 average pool -> dense head to 10 classes) whose head is named ``classifier`` and
comes *first* in the parameters (sorted dict keys, or the first attribute), before the conv
``features``: the case where "the last top-level entry is the head" picks the wrong layer.
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.datasets import load_digits

from mini_unlearn_jax.core.adapters import (
    KINDS,
    Model,
    as_model,
    find_head,
    model_kind,
    scale_group,
    update_module,
    weight_mask,
)
from mini_unlearn_jax.core.models import make_objective

L2 = 1e-2


@pytest.fixture(scope="module")
def data():
    digits = load_digits()
    x = jnp.asarray(digits.images[:48, :, :, None] / 16.0, jnp.float32)  # [48, 8, 8, 1]
    y = jnp.asarray(digits.target[:48], jnp.int32)
    return x, y


def _pool_flatten(h):
    """[B, 8, 8, 4] -> [B, 64] after 2x2 average pooling."""
    b = h.shape[0]
    return h.reshape(b, 4, 2, 4, 2, 4).mean(axis=(2, 4)).reshape(b, -1)


# -- the four CNNs -----------------------------------------------------------------------------
class LinenCNN(nn.Module):
    """setup()-style: the head is assigned first; after any ``jax.tree.map`` (an optimizer step)
    the params dict is in sorted order, ``classifier`` before ``features``."""

    def setup(self):
        self.classifier = nn.Dense(10)
        self.features = nn.Conv(4, (3, 3))

    def __call__(self, x):
        return self.classifier(_pool_flatten(nn.relu(self.features(x))))


class NnxCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, dropout: float = 0.0, batch_norm: bool = False):
        self.classifier = nnx.Linear(64, 10, rngs=rngs)
        self.features = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs) if batch_norm else None
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x):
        h = self.features(x)
        if self.norm is not None:
            h = self.norm(h)
        return self.classifier(self.dropout(_pool_flatten(nnx.relu(h))))


class EqxCNN(eqx.Module):
    """Per-example (equinox style): ``x[8, 8, 1] -> logits[10]``."""

    classifier: eqx.nn.Linear
    features: eqx.nn.Conv2d

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.classifier = eqx.nn.Linear(64, 10, key=k1)
        self.features = eqx.nn.Conv2d(1, 4, 3, padding=1, key=k2)

    def __call__(self, x):
        h = jax.nn.relu(self.features(jnp.transpose(x, (2, 0, 1))))  # [4, 8, 8], channels first
        return self.classifier(_pool_flatten(jnp.transpose(h, (1, 2, 0))[None])[0])


def fn_cnn(params, x):
    conv, dense = params["features"], params["classifier"]
    h = jax.lax.conv_general_dilated(x, conv["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return _pool_flatten(jax.nn.relu(h + conv["bias"])) @ dense["kernel"] + dense["bias"]


def fn_params(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    # written head first: a plain dict keeps that order
    return {"classifier": {"kernel": 0.3 * jax.random.normal(k1, (64, 10)),
                           "bias": jnp.full((10,), 0.1)},
            "features": {"kernel": 0.5 * jax.random.normal(k2, (3, 3, 1, 4)),
                         "bias": jnp.full((4,), 0.05)}}


def build(kind, x):
    """``(user_model, params_for_as_model, own_forward(x) -> logits, own_loss_grad(x, y) -> grads)``
    where the last two use only the user's framework (not the adapter)."""

    def ce(logits, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    if kind == "linen":
        model = LinenCNN()
        # jax.tree.map as an optimizer step does: the dict comes back in sorted key order
        params = jax.tree.map(jnp.asarray, model.init(jax.random.key(0), x[:1])["params"])
        return (model, params, lambda x: model.apply({"params": params}, x),
                lambda x, y: jax.grad(lambda p: ce(model.apply({"params": p}, x), y))(params))
    if kind == "nnx":
        model = NnxCNN(nnx.Rngs(0), dropout=0.5, batch_norm=True)
        model.eval()  # frozen BatchNorm statistics, no dropout: a pure forward pass
        return (model, None, lambda x: model(x),
                lambda x, y: nnx.to_pure_dict(nnx.grad(lambda m: ce(m(x), y))(model)))
    if kind == "equinox":
        model = EqxCNN(jax.random.key(0))
        return (model, None, lambda x: jax.vmap(model)(x),
                lambda x, y: eqx.filter_grad(lambda m: ce(jax.vmap(m)(x), y))(model))
    params = fn_params()
    return (fn_cnn, params, lambda x: fn_cnn(params, x),
            lambda x, y: jax.grad(lambda p: ce(fn_cnn(p, x), y))(params))


def old_heuristic(params):
    """The last top-level entry of the params (what ``scale_head`` used to take as the head; for
    an equinox module, its last parameter attribute)."""
    if isinstance(params, dict):
        return list(params.keys())[-1]
    return jax.tree_util.tree_flatten_with_path(params)[0][-1][0][0].name


def snapshot(module):
    """Host copies of all of an nnx module's state (RNG keys as their raw key data)."""
    def host(a):
        return np.asarray(jax.random.key_data(a) if jax.dtypes.issubdtype(
            a.dtype, jax.dtypes.prng_key) else a)
    return jax.tree.map(host, nnx.to_pure_dict(nnx.state(module)))


def _close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v),
                                                         rtol=rtol, atol=atol), a, b)


# -- (a) forward pass, (b) objective gradients ------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_apply_matches_the_users_forward_pass(kind, data):
    x, _ = data
    model, params, forward, _ = build(kind, x)
    adapter = as_model(model, params)
    assert adapter.kind == kind and model_kind(model) == kind
    assert as_model(adapter) is adapter
    expected = forward(x)
    np.testing.assert_array_equal(np.asarray(adapter.apply_fn(adapter.params, x)), expected)
    _close(jax.jit(adapter.apply_fn)(adapter.params, x), expected)
    if kind in ("linen", "nnx"):  # a plain nested dict the library can treat as any pytree
        assert type(adapter.params) is dict and all(type(v) is dict for v in adapter.params.values())


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("through_adapter", [True, False])
def test_make_objective_gradients_match_a_hand_written_loss(kind, through_adapter, data):
    x, y = data
    model, params, _, own_grad = build(kind, x)
    adapter = as_model(model, params)
    # the adapter, or the user's model itself (linen: the unchanged linen path of make_objective)
    obj = make_objective(adapter if through_adapter else model, L2)
    assert obj.kind == "generic"
    grads = jax.jit(jax.grad(obj.data_loss))(adapter.params, x, y)
    _close(grads, own_grad(x, y), rtol=1e-4, atol=1e-6)
    # the L2 term penalizes the kernels (equinox: "weight") and not the biases
    mask = obj.l2_mask(adapter.params)
    assert sum(jax.tree.leaves(mask)) == 2  # the conv and dense kernels (nnx: not BatchNorm)
    kernels = [p for p, m in zip(jax.tree.leaves(adapter.params), jax.tree.leaves(mask),
                                 strict=True) if m]
    assert all(k.ndim >= 2 for k in kernels)
    np.testing.assert_allclose(obj.penalty(adapter.params),
                               0.5 * L2 * sum(float(jnp.sum(k * k)) for k in kernels), rtol=1e-5)


def test_weight_mask_selects_equinox_kernels():
    params = as_model(EqxCNN(jax.random.key(1))).params
    mask = weight_mask(params)
    assert mask.classifier.weight and mask.features.weight
    assert not mask.classifier.bias and not mask.features.bias


# -- (c) rebuild and update in place ----------------------------------------------------------
def test_rebuild_round_trips_linen_and_function(data):
    x, _ = data
    for kind in ("linen", "function"):
        model, params, forward, _ = build(kind, x)
        adapter = as_model(model, params)
        assert adapter.rebuild(adapter.params) is adapter.params
        np.testing.assert_array_equal(adapter.apply_fn(adapter.rebuild(adapter.params), x), forward(x))


def test_rebuild_round_trips_equinox(data):
    x, _ = data
    model = EqxCNN(jax.random.key(0))
    adapter = as_model(model)
    rebuilt = adapter.rebuild(adapter.params)
    assert isinstance(rebuilt, EqxCNN) and eqx.tree_equal(rebuilt, model)
    np.testing.assert_array_equal(jax.vmap(rebuilt)(x), jax.vmap(model)(x))
    doubled = scale_group(adapter.params, ("classifier",), 2.0)
    np.testing.assert_array_equal(jax.vmap(adapter.rebuild(doubled))(x),
                                  adapter.apply_fn(doubled, x))


def test_nnx_apply_and_rebuild_do_not_mutate_the_module_and_update_module_does(data):
    x, _ = data
    model = NnxCNN(nnx.Rngs(0), dropout=0.5, batch_norm=True)
    model.eval()
    before = snapshot(model)
    kernel_var = model.classifier.kernel
    original = model(x)
    adapter = as_model(model)
    other = jax.tree.map(lambda a: a + 0.1, adapter.params)

    out = jax.jit(adapter.apply_fn)(other, x)
    eager = adapter.apply_fn(other, x)
    rebuilt = adapter.rebuild(other)
    _close(out, eager)
    np.testing.assert_array_equal(rebuilt(x), eager)
    assert isinstance(rebuilt, NnxCNN) and rebuilt is not model
    assert rebuilt.classifier.kernel is not model.classifier.kernel
    rebuilt.classifier.kernel[...] = jnp.zeros_like(rebuilt.classifier.kernel[...])  # a user edit
    # the user's module is untouched by apply_fn, rebuild and edits of the rebuilt module
    _close(snapshot(model), before, rtol=0, atol=0)
    np.testing.assert_array_equal(model(x), original)
    np.testing.assert_array_equal(adapter.apply_fn(adapter.params, x), original)
    # non-parameter state (BatchNorm statistics, RNG streams) is carried over to the rebuilt one
    np.testing.assert_array_equal(rebuilt.norm.mean[...], model.norm.mean[...])

    assert update_module(model, other) is model
    assert model.classifier.kernel is kernel_var  # same Variable objects, new values
    np.testing.assert_array_equal(model(x), eager)
    # the adapter made before the update keeps its own copy of the module
    np.testing.assert_array_equal(adapter.apply_fn(adapter.params, x), original)


# -- (d) the head ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_find_head_finds_the_head_defined_first(kind, data):
    x, _ = data
    model, params, _, _ = build(kind, x)
    adapter = as_model(model, params)
    # at initialization (flax: zero biases, BatchNorm scale 1 and bias 0) every layer in front of
    # the ReLU also scales zero-bias logits by a positive factor: find_head must not be fooled
    head = find_head(adapter.apply_fn, adapter.params, x)
    assert head == ("classifier",)
    # the old rule (the last top-level entry) would have taken another layer (conv or BatchNorm)
    old = old_heuristic(adapter.params)
    assert old in ("features", "norm") and old != head[0]

    # "trained" parameters (no bias exactly zero): the head is still found, and only it scales
    p = jax.tree.map(lambda a: a + 0.05, adapter.params)
    assert find_head(adapter.apply_fn, p, x) == head
    t = 3.0
    logits = adapter.apply_fn(p, x)
    scaled = scale_group(p, head, t)
    _close(adapter.apply_fn(scaled, x), t * logits, rtol=1e-5, atol=1e-5)
    assert jax.tree.map(lambda a: a.dtype, scaled) == jax.tree.map(lambda a: a.dtype, p)
    wrong = adapter.apply_fn(scale_group(p, (old,), t), x)
    assert not np.allclose(wrong, t * logits, rtol=1e-2)


def test_find_head_on_a_linen_module_with_nested_groups(data):
    x, _ = data

    class Deep(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x.reshape(x.shape[0], -1)
            x = nn.relu(nn.Dense(16, name="Dense_0")(x))
            x = nn.LayerNorm(name="norm")(x)
            return nn.Dense(10, name="Dense_1")(x)

    model = Deep()
    params = model.init(jax.random.key(0), x[:1])["params"]
    adapter = as_model(model, {"params": params})  # the full variables dict is accepted too
    assert find_head(adapter.apply_fn, adapter.params, x) == ("Dense_1",)
    assert find_head(adapter.apply_fn, scale_group(adapter.params, "Dense_1", 0.5), x) == ("Dense_1",)


def test_find_head_refuses_when_no_group_scales_the_logits(data):
    x, _ = data
    params = fn_params()

    def squashed(p, x):  # tanh of the logits: no group scales them linearly
        return jnp.tanh(fn_cnn(p, x))

    with pytest.raises(ValueError, match=r"could not be found.*head=\("):
        find_head(squashed, params, x)
    with pytest.raises(ValueError, match="zero or not finite"):
        find_head(lambda p, x: 0.0 * fn_cnn(p, x), params, x)
    # a zero-initialized head (LogisticRegression's) is still found: the probe perturbs params
    zero = jax.tree.map(jnp.zeros_like, params)
    assert find_head(fn_cnn, zero, x) == ("classifier",)
    with pytest.raises(ValueError, match="no parameter"):
        scale_group(params, ("head",), 2.0)


def test_per_example_and_batched_switches(data):
    x, _ = data
    params = fn_params()
    per_example = as_model(lambda p, xi: fn_cnn(p, xi[None])[0], params, batched=False)
    np.testing.assert_allclose(per_example.apply_fn(params, x), fn_cnn(params, x), rtol=1e-5, atol=1e-6)

    class Batched(eqx.Module):
        inner: EqxCNN

        def __call__(self, xb):
            return jax.vmap(self.inner)(xb)

    model = Batched(EqxCNN(jax.random.key(0)))
    batched = as_model(model, batched=True)
    np.testing.assert_array_equal(batched.apply_fn(batched.params, x), model(x))
    assert find_head(batched.apply_fn, batched.params, x) == ("inner", "classifier")


# -- (e) what is refused -----------------------------------------------------------------------
def test_bad_inputs_say_what_to_do(data):
    x, _ = data
    with pytest.raises(TypeError, match="flax.linen Module.*flax.nnx Module.*equinox Module"):
        as_model("cnn")
    with pytest.raises(TypeError, match="flax.linen Module"):
        make_objective("cnn", L2)
    with pytest.raises(TypeError, match="a class is|cannot adapt"):
        as_model(LinenCNN)
    with pytest.raises(ValueError, match=r"needs its parameters.*model.init"):
        as_model(LinenCNN())
    with pytest.raises(ValueError, match="without params"):
        as_model(NnxCNN(nnx.Rngs(0)), {"classifier": {}})
    with pytest.raises(ValueError, match="without params"):
        as_model(EqxCNN(jax.random.key(0)), {})
    with pytest.raises(ValueError, match="needs the parameters"):
        as_model(fn_cnn)
    with pytest.raises(TypeError, match="nnx Module in place"):
        update_module(EqxCNN(jax.random.key(0)), {})

    class WithBatchNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.BatchNorm(use_running_average=True)(x.reshape(x.shape[0], -1)))

    variables = WithBatchNorm().init(jax.random.key(0), x[:1])
    with pytest.raises(ValueError, match=r"batch_stats.*not supported yet.*without BatchNorm"):
        as_model(WithBatchNorm(), variables)


@pytest.mark.parametrize("layer", ["dropout", "batch_norm"])
def test_nnx_training_mode_is_refused(layer, data):
    x, _ = data
    model = (NnxCNN(nnx.Rngs(0), dropout=0.5) if layer == "dropout"
             else NnxCNN(nnx.Rngs(0), batch_norm=True))
    before = snapshot(model)
    adapter = as_model(model)
    for apply in (adapter.apply_fn, jax.jit(adapter.apply_fn)):
        with pytest.raises(ValueError, match=r"changed its state.*model.eval\(\)"):
            apply(adapter.params, x)
    _close(snapshot(model), before, rtol=0, atol=0)
    model.eval()
    evaluated = as_model(model)
    np.testing.assert_array_equal(evaluated.apply_fn(evaluated.params, x), model(x))


def test_model_is_a_named_tuple():
    assert Model._fields == ("apply_fn", "params", "rebuild", "kind")


@pytest.mark.slow
def test_the_trainer_keeps_a_snapshot_buffer_for_an_equinox_model():
    """An equinox module is callable: its gradient (itself a module) must be stored, not called."""
    import mini_unlearn_jax as mu

    model = eqx.nn.MLP(4, 3, 8, 1, key=jax.random.key(0))
    adapter = mu.as_model(model)
    obj = mu.make_objective(adapter, 1e-4)
    x = jax.random.normal(jax.random.key(1), (64, 4))
    y = jnp.arange(64) % 3
    cfg = mu.TrainConfig(optimizer="adam", steps=20, batch_size=16, snapshots=2, snapshot_every=10)
    st = mu.Trainer(obj, cfg).fit(adapter.params, x, y)
    newest = jax.tree.map(lambda a: a[(int(st.snapshots.count) - 1) % 2], st.snapshots.grads)
    want = jax.grad(obj.data_loss)(st.params, x, y)
    for a, b in zip(jax.tree.leaves(newest), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
