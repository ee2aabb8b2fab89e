"""Ready batch functions, following the seed protocol.

``base_bfn(bsz=N, gen=torch.Generator, X=None, y=None, **kwargs) -> batch_fn(step) -> (X, y)``:
give one as ``bfn_config={"base_bfn": monomial_bfn, "d": 32, ...}``. With ``ONLINE=True`` the
engine calls ``batch_fn(step)`` every step and gets a fresh batch; with ``ONLINE=False`` it draws
one fixed training set, ``batch_fn(trial)``, per job. Either way the draws come from ``gen``,
which the engine seeds from the job's seed, so a job's data never depends on where it runs.

- ``monomial_bfn``: power-law Gaussian inputs, a Hermite monomial target (``target`` is
  usually an iterator axis: ``iterators=[targets, ...], iterator_names=["target", ...]``).
- ``pool_bfn``: random rows of a fixed pool of samples (any data set in memory).
- ``image_bfn``: ``pool_bfn`` over digits or CIFAR-10 with preprocessing, loaded once per process.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from modelscape.data import images
from modelscape.data.hermite import Monomial, MonomialLike
from modelscape.data.synthetic import powerlaw_eigenvalues

BatchFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def _fixed(X: torch.Tensor, y: torch.Tensor) -> BatchFn:
    def batch_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return X, y

    return batch_fn


def monomial_bfn(
    bsz: int,
    gen: torch.Generator,
    X: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    *,
    target: MonomialLike,
    d: int = 32,
    alpha: float = 1.5,
    offset: float = 0.0,
    noise: float = 0.0,
    **_: object,
) -> BatchFn:
    """Inputs ``x ~ N(0, diag(gamma))`` with ``gamma = powerlaw_eigenvalues(d, alpha, offset)``,
    target ``y = target(z) + noise * N(0, 1)`` with ``z = x / sqrt(gamma)``.

    ``target`` is a ``Monomial`` or its string (``"x0^2*x3"``); it has unit variance, so a
    zero predictor has loss 1 under ``MSELoss`` (plus ``noise**2``).
    """
    if X is not None and y is not None:
        return _fixed(X, y)
    monomial = Monomial(target)
    if monomial.max_coordinate >= d:
        raise ValueError(f"target {monomial} uses coordinate {monomial.max_coordinate}; d={d}.")
    scale = powerlaw_eigenvalues(d, alpha, offset).sqrt().to(torch.float32).to(gen.device)

    def batch_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(bsz, d, generator=gen, device=gen.device)
        yb = monomial(z)
        if noise:
            yb = yb + noise * torch.randn(bsz, generator=gen, device=gen.device)
        return z * scale, yb

    return batch_fn


def pool_bfn(
    bsz: int,
    gen: torch.Generator,
    X: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    *,
    X_pool: torch.Tensor,
    y_pool: torch.Tensor,
    n_pool: int | None = None,
    **_: object,
) -> BatchFn:
    """Batches of ``bsz`` distinct rows drawn at random from ``(X_pool, y_pool)``.

    ``n_pool`` restricts the pool to its first rows (a smaller training set to sample from).
    """
    if X is not None and y is not None:
        return _fixed(X, y)
    if X_pool.shape[0] != y_pool.shape[0]:
        raise ValueError(f"X_pool has {X_pool.shape[0]} rows but y_pool has {y_pool.shape[0]}.")
    n = X_pool.shape[0] if n_pool is None else int(n_pool)
    if not 0 < n <= X_pool.shape[0]:
        raise ValueError(f"n_pool={n_pool} must be in 1..{X_pool.shape[0]} (the pool's size).")
    if bsz > n:
        raise ValueError(
            f"asked for batches of {bsz} from a pool of {n} samples; lower N_SAMPLES or grow "
            "the pool."
        )
    Xp, yp = X_pool[:n].to(gen.device), y_pool[:n].to(gen.device)

    def batch_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randperm(n, generator=gen, device=gen.device)[:bsz]
        return Xp[idx], yp[idx]

    return batch_fn


@dataclass(frozen=True)
class ImageData:
    """A preprocessed image data set: train and test splits, preprocessed with train statistics."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_outputs(self) -> int:
        """Model outputs needed: 1 for a +-1 binary task, else the number of classes/columns."""
        if self.y_train.is_floating_point():
            return 1 if self.y_train.ndim == 1 else self.y_train.shape[1]
        return int(self.y_train.max()) + 1


@functools.lru_cache(maxsize=4)
def load_image_data(
    name: str = "digits",
    *,
    root: str | None = None,
    classes: tuple[int, ...] | None = None,
    onehot: bool = False,
    to_grayscale: bool = False,
    centered: bool = True,
    normalized: bool = True,
    zca_strength: float | None = None,
) -> ImageData:
    """Load ``"digits"`` or ``"cifar10"`` and preprocess both splits with train statistics.

    Steps, in order: ``to_grayscale``; ``select_classes(classes)`` (two classes give +-1
    labels); ``centered`` subtracts the training mean image; ``zca_strength`` whitens
    (``None`` skips it); ``normalized`` scales each sample to unit RMS entry; ``onehot`` turns
    int labels into one-hot float targets. Cached per process, so batch functions that call it
    load the files once. ``root`` (CIFAR-10 only) defaults to ``$DATASETPATH``.
    """
    if name == "digits":
        X_tr, y_tr = images.load_digits("train")
        X_te, y_te = images.load_digits("test")
    elif name == "cifar10":
        root = root if root is not None else os.environ.get("DATASETPATH")
        X_tr, y_tr = images.load_cifar10(root, "train")
        X_te, y_te = images.load_cifar10(root, "test")
    else:
        raise ValueError(f"unknown image data set {name!r}; choose 'digits' or 'cifar10'.")
    if to_grayscale:
        X_tr, X_te = images.grayscale(X_tr), images.grayscale(X_te)
    if classes is not None:
        X_tr, y_tr = images.select_classes(X_tr, y_tr, classes)
        X_te, y_te = images.select_classes(X_te, y_te, classes)
    if centered:
        mean = X_tr.mean(0, keepdim=True)
        X_tr, X_te = images.center(X_tr, mean), images.center(X_te, mean)
    if zca_strength is not None:
        X_tr, X_te = images.zca_whiten(X_tr, zca_strength, X_te)
    if normalized:
        X_tr, X_te = images.normalize_samples(X_tr), images.normalize_samples(X_te)
    if onehot and not y_tr.is_floating_point():
        k = int(max(y_tr.max(), y_te.max())) + 1
        y_tr, y_te = images.one_hot(y_tr, k), images.one_hot(y_te, k)
    return ImageData(X_tr, y_tr, X_te, y_te)


def image_bfn(
    bsz: int,
    gen: torch.Generator,
    X: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    *,
    dataset: str = "digits",
    root: str | None = None,
    classes: Sequence[int] | None = None,
    onehot: bool = False,
    to_grayscale: bool = False,
    zca_strength: float | None = None,
    n_pool: int | None = None,
    **_: object,
) -> BatchFn:
    """Random training batches of ``dataset`` (see ``load_image_data`` for the options).

    The test set is the data set's test split: pass it as ``X_te``/``y_te`` in
    ``global_config`` (``data = load_image_data(...)``; ``X_te=data.X_test``), since a batch
    function is also what draws the test set when none is given.
    """
    if X is not None and y is not None:
        return _fixed(X, y)
    data = load_image_data(
        dataset,
        root=root,
        classes=tuple(classes) if classes is not None else None,
        onehot=onehot,
        to_grayscale=to_grayscale,
        zca_strength=zca_strength,
    )
    return pool_bfn(bsz, gen, X_pool=data.X_train, y_pool=data.y_train, n_pool=n_pool)
