"""Synthetic Gaussian data with a power-law covariance spectrum.

The covariance is diagonal, so coordinate ``i`` is already the ``i``-th principal coordinate:
``x_i = sqrt(gamma_i) * z_i`` with ``z ~ N(0, I)`` and ``gamma_i`` decreasing. For real data,
``principal_coordinates`` finds the basis and the spectrum from samples.
"""

from __future__ import annotations

import torch


def powerlaw_eigenvalues(d: int, alpha: float, offset: float = 0.0) -> torch.Tensor:
    """Covariance eigenvalues ``gamma_i ∝ (i + offset)^(-alpha)``, ``i = 1..d``, summing to 1.

    Summing to 1 puts the samples near the unit sphere (``E|x|^2 = 1``), the convention of the
    HEA eigenvalues in ``modelscape.data.hea``. ``offset`` flattens the head of the spectrum.
    """
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}.")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (a decaying spectrum), got {alpha}.")
    if 1 + offset <= 0:
        raise ValueError(f"offset must be > -1 so that every i + offset is positive, got {offset}.")
    i = torch.arange(1, d + 1, dtype=torch.float64)
    gamma = (i + offset) ** (-alpha)
    return gamma / gamma.sum()


def powerlaw_gaussian(
    n: int,
    d: int,
    alpha: float,
    offset: float = 0.0,
    *,
    gen: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` samples of ``N(0, diag(gamma))``, ``gamma = powerlaw_eigenvalues(d, alpha, offset)``.

    Returns ``(X, z, gamma)``: the samples (n, d), their whitened coordinates
    ``z = X / sqrt(gamma)`` (what Hermite targets take) and the eigenvalues. Samples are drawn
    on ``gen``'s device.
    """
    device = gen.device if gen is not None else torch.device("cpu")
    gamma = powerlaw_eigenvalues(d, alpha, offset)
    z = torch.randn(n, d, generator=gen, device=device, dtype=dtype)
    X = z * gamma.sqrt().to(device=device, dtype=dtype)
    return X, z, gamma


def principal_coordinates(
    X: torch.Tensor, *, eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whitened principal coordinates of data ``X`` (n, ...): ``(z, gamma, basis)``.

    ``gamma`` are the covariance eigenvalues in decreasing order, normalized to sum to 1 (so
    they feed ``hea_eigenvalue`` directly); ``z = (X - mean) @ basis / sqrt(gamma_raw)`` has unit
    variance in every direction, which is what ``Monomial`` and ``hermite`` expect. Directions
    with eigenvalue below ``eps`` times the largest are dropped.

    The normalized ``gamma`` describes the network's inputs only if they are centered and scaled
    to ``E|x|^2 = 1`` (divide ``X - mean`` by the square root of the covariance trace): a ReLU
    NTK with biases is not scale-invariant, so its level coefficients depend on ``|x|^2``.
    """
    flat = X.reshape(X.shape[0], -1).to(torch.float64)
    flat = flat - flat.mean(0)
    cov = flat.T @ flat / flat.shape[0]
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.flip(1)
    keep = evals > eps * evals[0]
    evals, evecs = evals[keep], evecs[:, keep]
    z = (flat @ evecs) / evals.sqrt()
    return z.to(X.dtype), evals / evals.sum(), evecs.to(X.dtype)
