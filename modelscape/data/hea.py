"""HEA eigenvalues: the Hermite eigenstructure ansatz for a ReLU NTK on anisotropic data.

Karkada, Turnbull, Liu, Simon, "Predicting kernel regression learning curves from only raw data
statistics" (ICLR 2026, arXiv:2510.14878). For a rotation-invariant kernel on Gaussian-enough
data with covariance eigenvalues ``gamma_1 >= gamma_2 >= ...``, the kernel's eigenfunctions are
approximately the normalized Hermite monomials of the whitened principal coordinates, and the
eigenvalue of the monomial with exponents ``alpha`` is

    lambda_alpha = c_|alpha| * prod_i gamma_i ** alpha_i,

where ``|alpha|`` is the degree and ``c_l`` is the kernel's ``l``-th *level coefficient*: the
``l``-th derivative at ``t = 0`` of the kernel written as a function of ``t = x . x'`` on the
sphere of radius ``sqrt(sum(gamma))``.

``relu_ntk_level_coefficients`` computes ``c_l`` for the NTK of a ReLU MLP of any depth, by the
standard layer recursion carried out on truncated power series in ``t``;
``top_hea_monomials`` lists the ``k`` monomials with the largest HEA eigenvalues, in order.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from modelscape.data.hermite import Monomial, MonomialLike

ArrayLike = Sequence[float] | np.ndarray | torch.Tensor


def _as_eigvals(data_eigvals: ArrayLike) -> np.ndarray:
    gamma = np.asarray(
        data_eigvals.detach().cpu() if isinstance(data_eigvals, torch.Tensor) else data_eigvals,
        dtype=np.float64,
    )
    if gamma.ndim != 1 or gamma.size == 0:
        raise ValueError(f"data_eigvals must be a non-empty 1-D array, got shape {gamma.shape}.")
    if np.any(gamma < 0):
        raise ValueError("data_eigvals are covariance eigenvalues and must be >= 0.")
    return gamma


def _inverse_sqrt_power_series(p: float, c0: float, n: int) -> np.ndarray:
    """Taylor coefficients of ``(1 - c^2)^(-p)`` around ``c0``, orders 0..n-1.

    From the ODE ``(1 - c^2) h' = 2 p c h`` written in ``delta = c - c0``.
    """
    A = 1.0 - c0 * c0
    a = np.zeros(max(n, 2))
    a[0] = A ** (-p)
    a[1] = 2 * p * c0 * a[0] / A
    for m in range(1, n - 1):
        a[m + 1] = (2 * c0 * (m + p) * a[m] + (m - 1 + 2 * p) * a[m - 1]) / (A * (m + 1))
    return a[:n]


def _arccos_kernel_series(c0: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Taylor coefficients around ``c0`` of the ReLU arc-cosine kernels (orders 0..n-1).

    ``k0(c) = (pi - arccos c) / pi`` and ``k1(c) = (sqrt(1 - c^2) + (pi - arccos c) c) / pi``
    (so ``k0(1) = k1(1) = 1``), using ``k0' = (1 - c^2)^(-1/2) / pi`` and ``k1' = k0``.
    """
    h = _inverse_sqrt_power_series(0.5, c0, n)
    k0 = np.zeros(n)
    k0[0] = (math.pi - math.acos(c0)) / math.pi
    k0[1:] = h[: n - 1] / (math.pi * np.arange(1, n))
    k1 = np.zeros(n)
    k1[0] = (math.sqrt(1 - c0 * c0) + (math.pi - math.acos(c0)) * c0) / math.pi
    k1[1:] = k0[: n - 1] / np.arange(1, n)
    return k0, k1


def _mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.convolve(a, b)[: a.size]


def _compose(f: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``f(g(t))`` as a series in ``t``, with ``f`` given as a series around ``g(0)``."""
    shift = g.copy()
    shift[0] = 0.0
    out = np.zeros_like(g)
    power = np.zeros_like(g)
    power[0] = 1.0
    for coeff in f:
        out += coeff * power
        power = _mul(power, shift)
    return out


def relu_ntk_level_coefficients(
    data_eigvals: ArrayLike,
    max_degree: int,
    *,
    depth: int = 1,
    weight_variance: float = 1.0,
    bias_variance: float = 0.0,
) -> np.ndarray:
    """Level coefficients ``c_0..c_max_degree`` of a ReLU MLP's NTK (``depth`` hidden layers).

    The kernel is the infinite-width NTK of ``x -> readout(relu(... relu(W_1 x + b_1)))``, with
    weights of variance ``weight_variance`` (per unit input norm) and biases of variance
    ``bias_variance`` in every layer, evaluated for inputs with ``|x|^2 = sum(data_eigvals)``.
    ``bias_variance=0`` matches the built-in ``MLP`` with ``BIAS=False`` (then, for depth 1,
    odd levels above 1 vanish). The readout's bias counts too: it adds ``bias_variance`` to
    ``c_0`` only (the HEA authors' ``ReluNTK`` leaves it out), so it moves the constant mode and
    no other. Only ratios of the returned values matter for learning order.
    """
    if max_degree < 0:
        raise ValueError(f"max_degree must be >= 0, got {max_degree}.")
    if depth < 1:
        raise ValueError(f"depth must be >= 1 hidden layer, got {depth}.")
    if weight_variance <= 0 or bias_variance < 0:
        raise ValueError("weight_variance must be > 0 and bias_variance >= 0.")
    rho = float(_as_eigvals(data_eigvals).sum())
    w, b = float(weight_variance), float(bias_variance)
    n = max_degree + 1
    sigma = np.zeros(n)  # first-layer pre-activation covariance, as a series in t = x . x'
    sigma[0] = b
    if n > 1:
        sigma[1] = w
    q = b + w * rho  # its value at t = |x|^2, the same for every input on the sphere
    theta = sigma.copy()
    for _ in range(depth):
        c = sigma / q
        k0, k1 = _arccos_kernel_series(float(c[0]), n)
        # E[relu(u) relu(v)] = q k1(c) / 2 and E[relu'(u) relu'(v)] = k0(c) / 2
        sigma = w * q / 2 * _compose(k1, c)
        sigma[0] += b
        sigma_dot = w / 2 * _compose(k0, c)
        theta = sigma + _mul(theta, sigma_dot)
        q = w * q / 2 + b
    factorials = np.array([math.factorial(level) for level in range(n)], dtype=np.float64)
    return theta * factorials


def hea_eigenvalue(
    monomial: MonomialLike, data_eigvals: ArrayLike, level_coeffs: ArrayLike
) -> float:
    """The HEA eigenvalue ``c_degree * prod_i gamma_i^alpha_i`` of one monomial."""
    m = Monomial(monomial)
    gamma = _as_eigvals(data_eigvals)
    coeffs = np.asarray(level_coeffs, dtype=np.float64)
    if m.degree >= coeffs.size:
        raise ValueError(
            f"{m} has degree {m.degree} but level_coeffs only go to degree {coeffs.size - 1}; "
            "compute them with a larger max_degree."
        )
    if m.max_coordinate >= gamma.size:
        raise ValueError(f"{m} uses coordinate {m.max_coordinate}; data has {gamma.size}.")
    return float(coeffs[m.degree] * np.prod([gamma[i] ** e for i, e in m]))


def hea_eigenvalues(
    monomials: Iterable[MonomialLike], data_eigvals: ArrayLike, level_coeffs: ArrayLike
) -> np.ndarray:
    """``hea_eigenvalue`` for each monomial."""
    return np.array([hea_eigenvalue(m, data_eigvals, level_coeffs) for m in monomials])


def top_hea_monomials(
    data_eigvals: ArrayLike, k: int, level_coeffs: ArrayLike
) -> tuple[list[Monomial], np.ndarray]:
    """The ``k`` monomials with the largest HEA eigenvalues, largest first, and their eigenvalues.

    Degrees run up to ``len(level_coeffs) - 1``; levels whose coefficient is 0 contribute
    nothing. ``data_eigvals`` must be sorted in decreasing order (as ``powerlaw_eigenvalues``
    and ``principal_coordinates`` return them). Best-first search with a priority queue: a
    degree-``l`` monomial is a sorted tuple of coordinate indices, and raising one index never
    raises the eigenvalue, so the queue only ever holds the frontier.
    """
    gamma = _as_eigvals(data_eigvals)
    if np.any(np.diff(gamma) > 0):
        raise ValueError("data_eigvals must be sorted in decreasing order.")
    coeffs = np.asarray(level_coeffs, dtype=np.float64)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")

    def value(indices: tuple[int, ...]) -> float:
        return float(coeffs[len(indices)] * np.prod(gamma[list(indices)]))

    heap: list[tuple[float, tuple[int, ...]]] = []
    seen: set[tuple[int, ...]] = set()
    for degree, c in enumerate(coeffs):
        if c > 0:
            root = (0,) * degree
            heapq.heappush(heap, (-value(root), root))
            seen.add(root)
    monomials: list[Monomial] = []
    values: list[float] = []
    while heap and len(monomials) < k:
        neg, indices = heapq.heappop(heap)
        powers: dict[int, int] = {}
        for i in indices:
            powers[i] = powers.get(i, 0) + 1
        monomials.append(Monomial(powers))
        values.append(-neg)
        for pos in range(len(indices)):
            if indices[pos] + 1 >= gamma.size:
                continue
            child = tuple(sorted(indices[:pos] + (indices[pos] + 1,) + indices[pos + 1 :]))
            if child not in seen:
                seen.add(child)
                heapq.heappush(heap, (-value(child), child))
    return monomials, np.asarray(values)
