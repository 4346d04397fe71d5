import gzip
import os
import struct

import numpy as np
import pytest

from mini_unlearn_jax.data import FASHION_MNIST_DIR, DataError, fingerprint, load_dataset

HAVE_FMNIST = os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-labels-idx1-ubyte.gz"))


@pytest.mark.skipif(not HAVE_FMNIST, reason="apt-get install dataset-fashion-mnist (done by .ci/run)")
def test_fashion_mnist_from_debian_idx_files():
    ds = load_dataset("fashion_mnist")
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert ds.num_classes == 10 and np.bincount(ds.y_train).tolist() == [6000] * 10
    small = load_dataset("fashion_mnist:n_train=500,n_test=100")
    np.testing.assert_array_equal(small.x_train, ds.x_train[:500])


def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_reader_missing_and_truncated_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MINI_UNLEARN_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist")
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (20, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 20))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (5, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 5))
    ds = load_dataset("fashion_mnist")
    assert ds.x_train.shape == (20, 784)
    raw = gzip.open(tmp_path / "train-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("fashion_mnist")


def test_npz_is_used_exactly_as_given(tmp_path):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.normal(size=(30, 3)) * 100, y_train=rng.integers(0, 4, 30),
                  x_test=rng.normal(size=(10, 3)), y_test=rng.integers(0, 4, 10))
    arrays["y_train"][:4] = [0, 1, 2, 3]
    np.savez(tmp_path / "d.npz", **arrays)
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    np.testing.assert_array_equal(ds.x_train, arrays["x_train"].astype(np.float32))
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    assert ds.num_classes == 4
    assert ds.fingerprint() == fingerprint(ds.x_train, ds.y_train)


@pytest.mark.parametrize("change,msg", [
    (lambda a: a.pop("y_test"), "lacks arrays"),
    (lambda a: a["x_train"].__setitem__((0, 0), np.nan), "NaN/inf"),
    (lambda a: a["x_test"].__setitem__((1, 1), np.inf), "NaN/inf"),
    (lambda a: a["y_train"].__setitem__(0, -1), "labels must lie"),
    (lambda a: a.__setitem__("y_train", a["y_train"][:-1]), "must have shape"),
    (lambda a: a.__setitem__("x_test", np.zeros((10, 5))), "feature shape"),
    (lambda a: a.__setitem__("y_train", a["y_train"] + 0.5), "integer class labels"),
    (lambda a: a.__setitem__("x_train", np.zeros((0, 3))), "must have shape|empty"),
])
def test_bad_npz_inputs_give_clear_errors(tmp_path, change, msg):
    rng = np.random.default_rng(1)
    arrays = dict(x_train=rng.normal(size=(30, 3)), y_train=rng.integers(0, 3, 30),
                  x_test=rng.normal(size=(10, 3)), y_test=rng.integers(0, 3, 10))
    change(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=msg):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


def test_npz_with_pickled_objects_is_refused(tmp_path):
    obj = np.empty(2, dtype=object)
    obj[:] = [{"a": 1}, None]
    np.savez(tmp_path / "p.npz", x_train=obj, y_train=np.zeros(2), x_test=np.zeros((1, 1)), y_test=np.zeros(1))
    with pytest.raises(DataError, match="pickled"):
        load_dataset(f"npz:{tmp_path / 'p.npz'}")
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")


def test_bundled_and_synthetic_sets():
    d = load_dataset("digits")
    assert d.num_classes == 10 and d.x_train.shape[1] == 64 and d.x_train.max() <= 1.0
    b = load_dataset("breast_cancer")
    assert b.num_classes == 2 and abs(float(b.x_train.mean())) < 1e-3
    s1, s2 = load_dataset("synthetic:n=50,d=3,classes=4,seed=7"), load_dataset("synthetic:n=50,d=3,classes=4,seed=7")
    np.testing.assert_array_equal(s1.x_train, s2.x_train)
    assert s1.fingerprint() != load_dataset("synthetic:n=50,d=3,classes=4,seed=8").fingerprint()
    for bad, msg in (("nope", "unknown data spec"), ("synthetic:n=x", "not a valid int"),
                     ("synthetic:q=1", "unknown option"), ("digits:n=3", "takes no options")):
        with pytest.raises(DataError, match=msg):
            load_dataset(bad)


def test_tfds_loader_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        ds = load_dataset("tfds:mnist")
    assert ds.x_train.shape == (24, 784) and ds.x_test.shape == (24, 784)
    assert ds.x_train.max() <= 1.0 and ds.num_classes <= 10


def test_tfds_higgs_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=30):
        ds = load_dataset("tfds:higgs:train[:80%];train[80%:]")
    assert ds.x_train.shape[1] == 28 and ds.num_classes == 2
    assert set(np.unique(ds.y_train)) <= {0, 1}
