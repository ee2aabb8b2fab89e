"""Image data sets from local files, and the usual preprocessing.

Loaders return ``(X, y)``: ``X`` a float32 tensor (n, channels, height, width) with pixels in
[0, 1], ``y`` int64 class labels. Nothing is downloaded:

- ``load_cifar10`` reads the standard python-pickle batches (``cifar-10-batches-py``) from a
  folder you pass, or from ``$DATASETPATH``.
- ``load_digits`` is scikit-learn's bundled 8x8 digits (1797 images), always available.

Preprocessing works on any (n, ...) tensor: ``grayscale``, ``center``, ``normalize_samples``,
``zca_whiten``; ``select_classes`` and ``one_hot`` shape the labels.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from modelscape.errors import require_extra

Split = Literal["train", "test"]

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
DIGITS_TEST_FRACTION = 0.2  # digits ships as one set; a fixed permutation splits off the test part


def cifar10_folder(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the CIFAR-10 batches: ``root`` (default ``$DATASETPATH``) or its
    ``cifar-10-batches-py`` subfolder. Raises ``FileNotFoundError`` saying how to get them."""
    if root is None:
        root = os.environ.get("DATASETPATH")
    if root is None:
        raise FileNotFoundError(
            "CIFAR-10 needs a local copy: pass root=... (or --DATASETPATH in the examples) or "
            f"set $DATASETPATH to the folder holding {CIFAR10_FOLDER}/. {_HOW_TO_GET}"
        )
    root = Path(root).expanduser()
    for folder in (root / CIFAR10_FOLDER, root):
        if all((folder / name).is_file() for name in CIFAR10_TRAIN + CIFAR10_TEST):
            return folder
    raise FileNotFoundError(
        f"CIFAR-10 batches not found: expected {', '.join(CIFAR10_TRAIN + CIFAR10_TEST)} in "
        f"{root / CIFAR10_FOLDER} or {root}. {_HOW_TO_GET}"
    )


_HOW_TO_GET = (
    "Download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and "
    "extract it there (tar xzf cifar-10-python.tar.gz); modelscape never downloads data."
)


def load_cifar10(
    root: str | os.PathLike | None = None, split: Split = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from local python-pickle batches: ``X`` (n, 3, 32, 32) in [0, 1], ``y`` int64.

    ``split="train"`` has 50000 images, ``"test"`` 10000. ``root`` defaults to ``$DATASETPATH``.
    """
    folder = cifar10_folder(root)
    names = _split_names(split, CIFAR10_TRAIN, CIFAR10_TEST)
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    data = np.concatenate(images).reshape(-1, 3, 32, 32)
    X = torch.from_numpy(data.astype(np.float32) / 255.0)
    return X, torch.from_numpy(np.concatenate(labels))


def load_digits(split: Split | None = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits: ``X`` (n, 1, 8, 8) in [0, 1], ``y`` int64 in 0..9.

    A fixed permutation puts 20% of the 1797 images in ``"test"``, the rest in ``"train"``;
    ``split=None`` returns all of them in the original order.
    """
    require_extra("sklearn", "data", "the digits data set (load_digits)")
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    X = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    if split is None:
        return X, y
    order = np.random.default_rng(0).permutation(X.shape[0])
    n_test = int(round(DIGITS_TEST_FRACTION * X.shape[0]))
    idx = (
        order[n_test:]
        if _split_names(split, ("train",), ("test",)) == ("train",)
        else order[:n_test]
    )
    idx = torch.from_numpy(np.sort(idx))
    return X[idx], y[idx]


def _split_names(split: str, train: tuple[str, ...], test: tuple[str, ...]) -> tuple[str, ...]:
    if split == "train":
        return train
    if split == "test":
        return test
    raise ValueError(f"split must be 'train' or 'test', got {split!r}.")


def grayscale(X: torch.Tensor) -> torch.Tensor:
    """RGB (n, 3, h, w) to luminance (n, 1, h, w) with the ITU-R 601 weights."""
    if X.ndim != 4 or X.shape[1] != 3:
        raise ValueError(f"grayscale expects (n, 3, h, w) images, got shape {tuple(X.shape)}.")
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=X.dtype, device=X.device)
    return (X * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)


def center(X: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """Subtract the mean image (of ``X``, or the given ``mean``, e.g. the training set's)."""
    return X - (X.mean(0, keepdim=True) if mean is None else mean)


def normalize_samples(X: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each sample to unit root-mean-square entry, i.e. ``|x|^2 = number of features``."""
    flat = X.reshape(X.shape[0], -1)
    rms = flat.pow(2).mean(1, keepdim=True).sqrt().clamp_min(eps)
    return (flat / rms).reshape(X.shape)


def zca_whiten(
    X: torch.Tensor, strength: float, *others: torch.Tensor
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """ZCA whitening with regularization ``strength``, fitted on ``X`` and applied to ``others``.

    With covariance ``C = V diag(l) V^T`` the map is ``V diag(1 / sqrt(l + strength * mean(l)))
    V^T``: ``strength=0`` whitens fully, large values approach a plain rescaling. Inputs
    should be centered. Returns the whitened ``X`` (and each of ``others``, as a tuple).
    """
    if strength < 0:
        raise ValueError(f"ZCA strength must be >= 0, got {strength}.")
    flat = X.reshape(X.shape[0], -1).to(torch.float64)
    cov = flat.T @ flat / flat.shape[0]
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp_min(0)
    reg = strength * evals.mean()
    if reg == 0:
        reg = 1e-12 * evals.max()
    W = (evecs / (evals + reg).sqrt()) @ evecs.T

    def apply(A: torch.Tensor) -> torch.Tensor:
        out = A.reshape(A.shape[0], -1).to(torch.float64) @ W
        return out.to(A.dtype).reshape(A.shape)

    if not others:
        return apply(X)
    return (apply(X), *(apply(A) for A in others))


def select_classes(
    X: torch.Tensor, y: torch.Tensor, classes: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the samples of ``classes`` and relabel them.

    Two classes give a binary task with float labels ``+1`` (``classes[0]``) and ``-1``
    (``classes[1]``), e.g. digits 0-vs-6 with ``classes=[0, 6]``; more give int64 labels
    ``0..len(classes)-1`` in the order listed (use ``one_hot`` for regression on them).
    """
    classes = list(classes)
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"classes needs at least two distinct labels, got {classes}.")
    missing = [c for c in classes if not bool((y == c).any())]
    if missing:
        raise ValueError(
            f"classes {missing} do not occur in y (labels present: {y.unique().tolist()})."
        )
    mask = torch.zeros_like(y, dtype=torch.bool)
    new = torch.zeros_like(y)
    for i, c in enumerate(classes):
        mask |= y == c
        new[y == c] = i
    X, new = X[mask], new[mask]
    if len(classes) == 2:
        return X, 1.0 - 2.0 * new.to(torch.float32)
    return X, new


def one_hot(y: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Int labels (n,) to float32 one-hot targets (n, num_classes)."""
    if y.is_floating_point():
        raise ValueError("one_hot takes integer class labels, got a floating tensor.")
    return torch.nn.functional.one_hot(y, num_classes if num_classes else -1).to(torch.float32)
