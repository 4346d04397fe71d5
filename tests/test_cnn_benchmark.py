"""The CNN benchmark's protocol (app/harness/protocol.py), its pieces and a quick end-to-end run."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from mini_unlearn_jax.app.data import Dataset
from mini_unlearn_jax.app.harness import protocol as P
from mini_unlearn_jax.core.models import (
    PatchConv,
    ResidualCNN,
    build_model,
    init_params,
    make_objective,
)
from mini_unlearn_jax.core.training import TrainConfig, Trainer
from mini_unlearn_jax.evaluation.attacks import population_attack


@pytest.mark.parametrize("size,channels,features,kernel,stride",
                         [(28, 1, 16, 3, 2), (14, 16, 8, 3, 1), (7, 4, 8, 3, 2), (9, 3, 4, 5, 2), (8, 2, 3, 3, 2)])
def test_patch_conv_computes_flax_conv_with_the_same_parameters(size, channels, features, kernel, stride):
    x = jax.random.normal(jax.random.key(1), (2, size, size, channels))
    conv = PatchConv(features, kernel, stride)
    params = conv.init(jax.random.key(0), x)
    flax_conv = nn.Conv(features, (kernel, kernel), strides=stride, padding="SAME")
    np.testing.assert_allclose(conv.apply(params, x), flax_conv.apply(params, x), rtol=1e-5, atol=1e-5)
    # its own derivative rule gives flax's gradients (parameters and input) and Hessian-vector products
    loss = lambda module: (lambda p, x: jnp.sum(jnp.sin(module.apply(p, x))))
    for ours, ref in zip(jax.tree.leaves(jax.grad(loss(conv), argnums=(0, 1))(params, x)),
                         jax.tree.leaves(jax.grad(loss(flax_conv), argnums=(0, 1))(params, x)), strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    v = jax.tree.map(lambda a: jax.random.normal(jax.random.key(2), a.shape), params)
    hvp = lambda module: jax.jvp(lambda q: jax.grad(loss(module))(q, x), (params,), (v,))[1]
    for ours, ref in zip(jax.tree.leaves(hvp(conv)), jax.tree.leaves(hvp(flax_conv)), strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-3)


def test_residual_cnn_takes_flat_rows_and_refuses_non_square_ones():
    model = build_model("cnn", 10)
    assert isinstance(model, ResidualCNN)
    params = init_params(model, np.zeros(784, np.float32), 0)
    assert sum(a.size for a in jax.tree.leaves(params)) == 43_626
    assert model.apply({"params": params}, jnp.zeros((3, 784))).shape == (3, 10)
    with pytest.raises(ValueError, match="square"):
        model.apply({"params": params}, jnp.zeros((3, 780)))


def test_cosine_schedule_is_the_optax_one_and_no_buffer_trains_the_same_parameters():
    x = jax.random.normal(jax.random.key(0), (64, 5))
    y = (x[:, 0] > 0).astype(jnp.int32)
    model = build_model("mlp", 2, hidden=8)
    obj = make_objective(model, 1e-3)
    p0 = init_params(model, x[0], 0)
    cfg = TrainConfig(optimizer="sgd", learning_rate=0.5, lr_schedule="cosine", steps=30, batch_size=16, tol=0.0)
    with_buffer = Trainer(obj, cfg).fit(p0, x, y)
    without = Trainer(obj, dataclasses.replace(cfg, snapshots=0)).fit(p0, x, y)
    for a, b in zip(jax.tree.leaves(with_buffer.params), jax.tree.leaves(without.params), strict=True):
        np.testing.assert_array_equal(a, b)  # the buffer only reads the parameters
    assert without.snapshots == () and np.isnan(float(without.grad_norm))
    # the same run by hand with optax's cosine decay
    opt = optax.sgd(optax.cosine_decay_schedule(0.5, 30))
    trainer = Trainer(obj, cfg)
    p, s = p0, opt.init(p0)
    batch_loss = lambda q, idx, w: obj.data_loss(q, x[idx], y[idx], w) + obj.penalty(q)
    for t in range(30):
        idx, real = trainer._batch(jnp.asarray(t), jnp.ones(64))
        u, s = opt.update(jax.grad(batch_loss)(p, idx, real.astype(jnp.float32)), s, p)
        p = optax.apply_updates(p, u)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(with_buffer.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(optimizer="adam", lr_schedule="linear", batch_size=8)
    with pytest.raises(ValueError, match="snapshots=0"):
        TrainConfig(optimizer="lbfgs", snapshots=0)


def test_population_attack_matches_scikit_learn_and_reads_exchangeable_losses_as_indiscernible():
    rng = np.random.default_rng(0)
    same = population_attack(rng.exponential(1.0, 600), rng.exponential(1.0, 900))
    assert same["n_members"] == same["n_nonmembers"] == 600
    assert abs(same["accuracy"] - 0.5) < 0.06 and same["indiscernibility"] > 0.88 and abs(same["auc"] - 0.5) < 0.05
    members, nonmembers = rng.exponential(0.05, 500), rng.exponential(2.0, 500)  # members fit far better
    apart = population_attack(members, nonmembers)
    assert apart["accuracy"] > 0.85 and apart["indiscernibility"] < 0.3
    labels = np.r_[np.ones(500), np.zeros(500)]
    assert apart["auc"] == pytest.approx(roc_auc_score(labels, -np.r_[members, nonmembers]), abs=1e-12)
    # the accuracy is scikit-learn's logistic regression scored on held-out 10 % splits (the
    # attack permutes the examples first, so its splits differ: close, not equal)
    from sklearn.model_selection import StratifiedShuffleSplit
    feats = np.r_[members, nonmembers][:, None]
    accs = [LogisticRegression().fit((feats[a] - feats[a].mean()) / feats[a].std(), labels[a])
            .score((feats[b] - feats[a].mean()) / feats[a].std(), labels[b])
            for a, b in StratifiedShuffleSplit(10, test_size=0.1, random_state=0).split(feats, labels)]
    assert apart["accuracy"] == pytest.approx(np.mean(accs), abs=0.02)
    with pytest.raises(ValueError, match="at least"):
        population_attack(np.ones(3), np.ones(50))


def _dataset(n=400, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 16), np.float32)
    y = rng.integers(0, classes, n).astype(np.int32)
    return Dataset(x, y, x[:50], y[:50], classes, "toy")


def test_splits_are_disjoint_fixed_by_the_split_seed_and_each_request_is_what_it_says():
    ds = _dataset()
    cfg = P.ProtocolConfig(out="unused", seeds=(0, 1), forget_class=2)
    s = P.make_splits(ds, cfg)
    assert len(s.y) + len(s.y_val) == 400 and len(s.y_val) == 60  # 15 % held out
    again = P.make_splits(ds, cfg)
    for q in P.REQUESTS:
        np.testing.assert_array_equal(s.forget[q], again.forget[q])
    assert len(s.forget["random10"]) == round(0.1 * len(s.y))
    np.testing.assert_array_equal(s.forget["class"], np.flatnonzero(s.y == 2))
    flipped = np.flatnonzero(s.y_corrupted != s.y)
    np.testing.assert_array_equal(flipped, s.forget["mislabelled"])  # exactly the corrupted rows, every one changed
    assert len(flipped) == round(0.05 * len(s.y))
    np.testing.assert_array_equal(P.request_labels(s, "mislabelled"), s.y_corrupted)
    np.testing.assert_array_equal(P.request_labels(s, "class"), s.y)
    other = P.make_splits(ds, P.ProtocolConfig(out="unused", split_seed=1))
    assert not np.array_equal(other.forget["random10"], s.forget["random10"])


def test_tuning_score_is_deep_unlearns_objective_against_the_retrained_model():
    ref = {"retain_acc": 0.9, "forget_acc": 0.8, "other_acc": 0.85, "mia_accuracy": 0.55}
    assert P.tuning_score(ref, ref) == 0.0
    u = {"retain_acc": 0.93, "forget_acc": 0.95, "other_acc": 0.85, "mia_accuracy": 0.65}
    assert P.tuning_score(u, ref) == pytest.approx(np.sqrt((0.03 / 3) ** 2 + (0.15 / 3) ** 2 + (0.1 / 0.5) ** 2))


def test_config_refuses_what_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="unknown requests"):
        P.ProtocolConfig(out="x", requests=("random10", "half"))
    with pytest.raises(ValueError, match="unknown method"):
        P.ProtocolConfig(out="x", methods=("mini", "nope"))
    with pytest.raises(ValueError, match="tune_seed"):
        P.ProtocolConfig(out="x", seeds=(1, 2))
    with pytest.raises(ValueError, match="grids for methods not in"):
        P.ProtocolConfig(out="x", methods=("mini",), grids={"finetune": [{"lr": 1e-3}]})
    (tmp_path / "c.toml").write_text('out = "r"\nepochs = 2\nbogus = 1\n')
    with pytest.raises(ValueError, match="bogus"):
        P.ProtocolConfig.load(tmp_path / "c.toml")


def test_a_foreign_row_store_is_left_alone(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"something": "else"}\n')
    cfg = P.ProtocolConfig(out=str(tmp_path), data="synthetic:n=200,d=784")
    with pytest.raises(ValueError, match="left as it is"):
        P.run_protocol(cfg, fresh=True, log=lambda m: None)
    assert (tmp_path / "results.jsonl").read_text() == '{"something": "else"}\n'
    notes = 'my notes, not JSON\n{"method": "mini", "request": "class", "seed": 0}\n'
    (tmp_path / "results.jsonl").write_text(notes)  # a line that is not a row, even unreadable, is not ours
    with pytest.raises(ValueError, match="left as it is"):
        P.run_protocol(cfg, fresh=True, log=lambda m: None)
    assert (tmp_path / "results.jsonl").read_text() == notes
    # --fresh deletes the rows and the confidence files they name, nothing else in phi/
    (tmp_path / "results.jsonl").write_text('{"method": "mini", "request": "class", "seed": 0}\n')
    (tmp_path / "phi").mkdir()
    for name in ("class__mini__0.npy", "class__retrain__0.npy", "mine.npy", "class__mini__1.npy"):
        np.save(tmp_path / "phi" / name, np.zeros(2))
    (tmp_path / "table.md").write_text("the report of those rows")
    P.discard_earlier(tmp_path)
    assert sorted(p.name for p in (tmp_path / "phi").iterdir()) == ["class__mini__1.npy", "mine.npy"]
    assert not (tmp_path / "results.jsonl").exists() and not (tmp_path / "table.md").exists()
    # a table.md with no rows beside it is someone else's: neither a run nor --fresh replaces it
    (tmp_path / "table.md").write_text("my table")
    for fresh in (False, True):
        with pytest.raises(ValueError, match="did not write them"):
            P.run_protocol(cfg, fresh=fresh, log=lambda m: None)
    assert (tmp_path / "table.md").read_text() == "my table"


@pytest.mark.slow
def test_quick_benchmark_unlearns_closer_to_retraining_than_the_original_and_resumes(tmp_path):
    """The protocol end to end at small scale: one seed, 1,700 memorised training images, mini and
    fine-tuning on a random 10 %: mini's forget-set accuracy is closer to retraining's than the
    original's. The protocol does not depend on the model, so the test trains the MLP (15 s) rather
    than the benchmark's CNN (about 80 s here at this size); the CNN's own pieces are tested above."""
    cfg = P.ProtocolConfig(out=str(tmp_path), data="fashion_mnist:n_train=2000,n_test=2000", epochs=25, model="mlp",
                           seeds=(0,), requests=("random10",), methods=("mini", "finetune"),
                           grids={"mini": [{"budget": 0.1}, {"budget": 0.15}]})
    rows = P.run_protocol(cfg, log=lambda m: None, command="test")
    assert {(r["method"], r["request"], r["seed"]) for r in rows} == {("mini", "random10", 0), ("finetune", "random10", 0)}
    mini = next(r for r in rows if r["method"] == "mini")
    for key in ("test_acc", "forget_acc", "retain_acc", "auc", "retrain_test_acc", "retrain_forget_acc",
                "retrain_auc", "time_s", "retrain_time_s", "device"):
        assert mini[key] is not None, key
    assert mini["original_forget_acc"] - mini["retrain_forget_acc"] > 0.05  # the original memorised its forget set
    assert abs(mini["forget_acc"] - mini["retrain_forget_acc"]) < abs(mini["original_forget_acc"] - mini["retrain_forget_acc"])
    assert mini["time_s"] < mini["retrain_time_s"]
    tuning = [json.loads(line) for line in (tmp_path / "tuning.jsonl").read_text().splitlines()]
    assert sorted(t["options_label"] for t in tuning if t["method"] == "mini") == ["budget=0.1", "budget=0.15"]
    assert mini["options"] == min((t for t in tuning if t["method"] == "mini"), key=lambda t: t["score"])["options"]
    assert (tmp_path / "table.md").exists() and (tmp_path / "gap_vs_time.png").exists()
    before = (tmp_path / "results.jsonl").read_text()
    logs = []
    P.run_protocol(cfg, log=logs.append, command="test")  # a rerun resumes: nothing left to run
    assert "0 of 2" in logs[0] and (tmp_path / "results.jsonl").read_text() == before
