"""experiments/trajectory.py's data plumbing for the attacks' non-members (``--nonmembers``)."""

import importlib.util
from argparse import Namespace
from pathlib import Path

import numpy as np

from mini_unlearn_jax.app.data import validate

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("trajectory_script", ROOT / "experiments" / "trajectory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _full(n):
    rng = np.random.default_rng(0)
    x = rng.random((n, 4), dtype=np.float32)
    y = np.arange(n) % 3
    return validate(x, y, x[:20].copy(), y[:20].copy(), "synthetic", num_classes=3)


def test_block_split_is_a_seeded_partition_of_the_block():
    tj = _script()
    n = 50
    tr, pool = tj.block_split(n, seed=3)
    assert len(pool) == tj.POOL and len(tr) == n
    assert np.array_equal(np.sort(np.concatenate([tr, pool])), np.arange(n + tj.POOL))
    tr2, pool2 = tj.block_split(n, seed=3)
    assert np.array_equal(pool, pool2) and np.array_equal(tr, tr2)
    assert not np.array_equal(pool, tj.block_split(n, seed=4)[1])


def test_seed_data_maps_every_example_to_its_shadow_row():
    tj = _script()
    n = 50
    full = _full(n + tj.POOL)
    test_sets = {"x_pool": full.x_test[:5], "y_pool": full.y_test[:5], "x_val": full.x_test[5:], "y_val": full.y_test[5:]}
    ds, sets = tj.seed_data(7, Namespace(nonmembers="block", n_train=n), full, test_sets)
    # the seed's training images and non-members are the block's rows that the shadow indices name
    assert ds.n_train == n and len(sets["x_pool"]) == tj.POOL
    assert np.array_equal(full.x_train[sets["shadow_index"]], ds.x_train)
    assert np.array_equal(full.x_train[sets["shadow_index_pool"]], sets["x_pool"])
    assert np.array_equal(full.y_train[sets["shadow_index_pool"]], sets["y_pool"])
    assert not set(sets["shadow_index"]) & set(sets["shadow_index_pool"])
    assert np.array_equal(sets["x_val"], test_sets["x_val"])  # the method's held-out split stays on test images
    # the committed protocol: the training set unchanged, shadows on it followed by the test pool
    full_t = _full(n)
    ds_t, sets_t = tj.seed_data(7, Namespace(nonmembers="test", n_train=n), full_t, test_sets)
    assert ds_t is full_t and sets_t["x_pool"] is test_sets["x_pool"]
    assert np.array_equal(sets_t["shadow_index"], np.arange(n))
    assert np.array_equal(sets_t["shadow_index_pool"], n + np.arange(5))
