"""The original's ``modelscape.data.data``: power-law data, Hermite targets, image preprocessing
and its polynomial batch function, on top of ``modelscape.data`` (``hermite``, ``Monomial``,
``powerlaw_eigenvalues``).

Conventions are the original's: ``get_powerlaw(P, exp, offset)`` is ``(offset + i)^-exp`` for
``i = 0..P-1``; Hermite bases are evaluated on ``sqrt(N) * U`` of the data's SVD (uncentered);
tensors land on ``ensure_torch``'s default device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from modelscape.compat.utils import ensure_numpy, ensure_torch
from modelscape.data.hermite import hermite
from modelscape.data.monomial import Monomial, generate_hea_monomials
from modelscape.data.synthetic import powerlaw_eigenvalues
from modelscape.errors import require_extra


def get_powerlaw(P: int, exp: float, offset: float = 3, normalize: bool = True) -> np.ndarray:
    """``(offset + i)^-exp`` for ``i = 0..P-1``, summing to 1 if ``normalize``."""
    if normalize and offset > 0:
        return powerlaw_eigenvalues(P, exp, offset - 1).numpy()
    pl = (offset + np.arange(P)) ** -float(exp)
    return pl / pl.sum() if normalize else pl


def get_hermite_polynomials() -> dict[int, Callable[[Any], Any]]:
    """``{k: He_k}`` for k = 1..20, the probabilists' Hermite polynomials (not normalized)."""

    def he(k: int) -> Callable[[Any], Any]:
        def poly(x: Any) -> Any:
            t = torch.as_tensor(x, dtype=torch.float64)
            out = hermite(k, t) * math.sqrt(math.factorial(k))
            return out if isinstance(x, torch.Tensor) else out.numpy()

        return poly

    return {k: he(k) for k in range(1, 21)}


def compute_hermite_basis(X: Any, monomials: Any, is_X_PCAd: bool = False) -> np.ndarray:
    """``H[:, i]``: monomial ``i``'s normalized Hermite product on the rows of ``X``, divided by
    ``sqrt(N)``. Unless ``is_X_PCAd``, ``X`` is first mapped to ``sqrt(N) * U`` (its SVD)."""
    X = ensure_torch(X, dtype=torch.float64, device="cpu")
    N = X.shape[0]
    if not is_X_PCAd:
        U = torch.linalg.svd(X, full_matrices=False)[0]
        X = math.sqrt(N) * U
    if not isinstance(monomials, list):
        monomials = [monomials]
    columns = [Monomial(m).to_modelscape()(X) / math.sqrt(N) for m in monomials]
    return torch.stack(columns, dim=1).numpy()


def preprocess(X: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Flatten images (N, c, h, w) to (N, d). Options: ``grayscale`` (mean over channels),
    ``center``, ``normalize`` (unit-norm rows) and ``zca_strength`` (spectrum
    ``S / sqrt(z * S^2 + 1)`` with ``z = zca_strength / mean(S^2)``, rescaled to unit norm)."""
    X = torch.as_tensor(X)
    X = X.mean(dim=1).flatten(1) if kwargs.get("grayscale", False) else X.flatten(1)
    if kwargs.get("center", False):
        X = X - X.mean(0)
    if kwargs.get("normalize", False):
        X = X / torch.linalg.norm(X, dim=1, keepdim=True)
    strength = kwargs.get("zca_strength", 0)
    if strength:
        U, S, Vt = torch.linalg.svd(X, full_matrices=False)
        Sp = S / torch.sqrt(strength / torch.mean(S**2) * S**2 + 1)
        X = U @ torch.diag(Sp / torch.linalg.norm(Sp)) @ Vt
        if kwargs.get("center", False):
            X = X - X.mean(0)
    return X


def get_synthetic_X(
    d: int = 500,
    N: int = 15000,
    offset: float = 3,
    alpha: float = 1.5,
    data_eigvals: Any = None,
    gen: torch.Generator | None = None,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``N`` Gaussian samples with covariance ``diag(data_eigvals)`` (default
    ``get_powerlaw(d, alpha, offset)``), drawn on ``gen``'s device: ``(X, data_eigvals)``."""
    device = gen.device if gen is not None else None
    if data_eigvals is None:
        data_eigvals = get_powerlaw(d, alpha, offset=offset)
    data_eigvals = ensure_torch(data_eigvals, device=device)
    z = torch.randn(N, len(data_eigvals), generator=gen, device=data_eigvals.device)
    return z * torch.sqrt(data_eigvals), data_eigvals


def get_new_polynomial_data(
    lambdas: torch.Tensor,
    Vt: torch.Tensor,
    monomials: Any,
    dim: int,
    N: int,
    data_eigvals: torch.Tensor,
    N_original: int,
    new_X_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] = get_synthetic_X,
    coeffs: Any = 1,
    gen: torch.Generator | None = None,
) -> tuple[torch.Tensor, Any]:
    """Fresh samples ``X`` and the monomial target on them, expressed in the principal basis
    ``Vt`` (singular values ``lambdas``) of a reference sample of size ``N_original``."""
    X_new, _ = new_X_fn(d=dim, N=N, data_eigvals=data_eigvals, gen=gen)
    pca = X_new @ Vt.T @ torch.diag(lambdas**-1.0) * N_original**0.5
    y = coeffs * compute_hermite_basis(pca, monomials, is_X_PCAd=True) * N**0.5
    if y.ndim == 2:
        y = y.sum(axis=1) / y.shape[1]
    return X_new, y


def polynomial_batch_fn(
    lambdas: Any,
    Vt: Any,
    monomials: Any,
    bsz: int,
    data_eigvals: Any,
    N: int,
    X: Any = None,
    y: Any = None,
    data_creation_fn: Callable[..., tuple[Any, Any]] = get_new_polynomial_data,
    gen: torch.Generator | None = None,
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """The original's batch function: fixed ``(X, y)`` if given, else ``bsz`` fresh samples of
    the monomial target per call."""
    device = gen.device if gen is not None else None
    lambdas, Vt, data_eigvals = (
        ensure_torch(t, device=device) for t in (lambdas, Vt, data_eigvals)
    )

    def batch_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if X is not None and y is not None:
            return ensure_torch(X, device=device), ensure_torch(y, device=device)
        with torch.no_grad():
            Xb, yb = data_creation_fn(
                lambdas=lambdas, Vt=Vt, monomials=monomials, dim=len(data_eigvals), N=bsz,
                data_eigvals=data_eigvals, N_original=N, gen=gen,
            )  # fmt: skip
        return ensure_torch(Xb, device=device), ensure_torch(yb, device=device)

    return batch_fn


def get_synthetic_dataset(
    X: Any = None,
    data_eigvals: Any = None,
    d: int = 500,
    N: int = 15000,
    offset: float = 3,
    alpha: float = 1.5,
    cutoff_mode: int = 10000,
    noise_size: float = 0.1,
    yoffset: float = 3,
    beta: float = 1.2,
    normalized: bool = True,
    gen: torch.Generator | None = None,
    **kwargs: Any,
) -> tuple:
    """Power-law data and a target summing ``cutoff_mode`` HEA monomials with power-law weights
    plus noise: ``(X, y, H, monomials, hea_eigvals, v_true, data_eigvals)``. ``kerneltype``
    (an object with ``get_level_coeff_fn``) gives the kernel's level coefficients."""
    if X is None:
        X, data_eigvals = get_synthetic_X(d=d, N=N, offset=offset, alpha=alpha, gen=gen)
    kerneltype = kwargs.get("kerneltype")
    if kerneltype is None:
        raise ValueError("get_synthetic_dataset needs kerneltype=... (with get_level_coeff_fn).")
    level_fn = kerneltype.get_level_coeff_fn(
        kernel_width=kwargs.get("kernel_width", 2), data_eigvals=data_eigvals, **kwargs
    )
    hea_eigvals, monomials = generate_hea_monomials(
        data_eigvals, cutoff_mode, level_fn, kmax=kwargs.get("kmax", 9)
    )
    H = ensure_torch(compute_hermite_basis(X, monomials))
    v_true = ensure_torch(get_powerlaw(H.shape[1], beta / 2, offset=yoffset, normalize=normalized))
    if normalized:
        v_true = v_true / torch.linalg.norm(v_true) * N**0.5
    noise = torch.normal(0.0, noise_size, (H.shape[0],), generator=gen, device=H.device)
    y = H @ v_true + ensure_torch(noise)
    return X, y, H, monomials, ensure_torch(hea_eigvals), v_true, data_eigvals


def get_powerlaw_target(
    H: np.ndarray,
    source_exp: float,
    offset: float = 6,
    normalizeH: bool = False,
    include_noise: bool = False,
) -> np.ndarray:
    """A target ``H @ c`` with random-sign power-law coefficients ``c_k^2 ∝ (offset+k)^-source_exp``
    (plus the tail's share as noise if ``include_noise``), scaled to ``|y|^2 = M``."""
    if source_exp <= 1:
        raise ValueError("source_exp must be > 1 for powerlaw target")
    if offset < 1:
        raise ValueError("offset ≥ 1 required")
    require_extra("scipy", "data", "a power-law target")
    from scipy.special import zeta

    M, P = H.shape
    if normalizeH:
        H = H / np.linalg.norm(H, axis=0, keepdims=True)
    squared = get_powerlaw(P, source_exp, offset=offset)
    signs = -1 + 2 * np.random.randint(0, 2, size=squared.shape)
    y = H @ (np.sqrt(squared) * signs)
    if include_noise:
        total, tail = zeta(source_exp, offset), zeta(source_exp, offset + P)
        y = y / np.linalg.norm(y) + np.random.normal(0, np.sqrt(tail / (total - tail) / M), y.shape)
    return np.sqrt(M) * y / np.linalg.norm(y)


def get_binarized_dataset(
    dataset: str, classes: Sequence[Sequence[int]] | None, n_samples: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """``n_samples`` images of two class groups (labels -1/+1) from ``$DATASETPATH``'s
    ``cifar5m/part0.npz`` or ``svhn/svhn_all.npz``, or unlabeled ``imagenet/imagenet32.npz``."""
    root = os.getenv("DATASETPATH")
    if root is None:
        raise ValueError("set the DATASETPATH environment variable to the data sets' folder.")
    if dataset == "imagenet32":
        data = np.load(os.path.join(root, "imagenet", "imagenet32.npz"))
        X = data["data"][:n_samples].astype(float)
        if len(X) != n_samples:
            raise ValueError(f"imagenet32 has only {len(X)} samples.")
        return X.reshape(n_samples, 3, 32, 32), None
    files = {"cifar5m": ("cifar5m/part0.npz", "Y"), "svhn": ("svhn/svhn_all.npz", "y")}
    if dataset not in files:
        raise ValueError(f"dataset {dataset} not supported")
    path, label_key = files[dataset]
    raw = np.load(os.path.join(root, path))
    X, y = raw["X"], raw[label_key]
    c0, c1 = classes if classes is not None else ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    if dataset == "cifar5m":
        X = X.transpose(0, 3, 1, 2)
    idxs = np.concatenate(
        [
            np.flatnonzero(np.isin(y, c0))[: n_samples // 2],
            np.flatnonzero(np.isin(y, c1))[: n_samples // 2],
        ]
    )
    idxs = np.random.permutation(idxs)
    if len(idxs) != n_samples:
        raise ValueError("not enough samples of the specified classes")
    return X[idxs] / 255.0, -1 + 2 * np.isin(y[idxs], c1)


__all__ = [
    "compute_hermite_basis",
    "ensure_numpy",
    "ensure_torch",
    "get_binarized_dataset",
    "get_hermite_polynomials",
    "get_new_polynomial_data",
    "get_powerlaw",
    "get_powerlaw_target",
    "get_synthetic_X",
    "get_synthetic_dataset",
    "polynomial_batch_fn",
    "preprocess",
]
