"""Normalized Hermite polynomials and the ``Monomial`` type that names a multivariate one.

``hermite(k, z)`` is the probabilists' Hermite polynomial ``He_k(z) / sqrt(k!)``: for
``z ~ N(0, 1)`` these are orthonormal, ``E[h_j(z) h_k(z)] = delta_jk``. A ``Monomial`` such as
``x0^2*x3`` stands for the product ``h_2(z_0) * h_1(z_3)`` over whitened principal coordinates
``z`` of the data (see ``modelscape.data.principal_coordinates``), so every monomial target has
unit variance and distinct monomials are uncorrelated on Gaussian data.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from functools import total_ordering
from typing import Union

import torch

_FACTOR = re.compile(r"^x(\d+)(?:\^(\d+))?$")


def hermite(k: int, z: torch.Tensor) -> torch.Tensor:
    """``He_k(z) / sqrt(k!)``, elementwise, by the three-term recurrence (stable for large k)."""
    if k < 0:
        raise ValueError(f"Hermite degree must be >= 0, got {k}.")
    prev = torch.ones_like(z)
    if k == 0:
        return prev
    cur = z.clone()
    # normalized recurrence: h_{n+1} = (z h_n - sqrt(n) h_{n-1}) / sqrt(n + 1)
    for n in range(1, k):
        prev, cur = cur, (z * cur - math.sqrt(n) * prev) / math.sqrt(n + 1)
    return cur


MonomialLike = Union["Monomial", str, Mapping[int, int]]


@total_ordering
class Monomial:
    """A product of normalized Hermite polynomials of principal coordinates, e.g. ``x0^2*x3``.

    Build it from its printed form, ``Monomial("x0^2*x3")`` (``"1"`` is the constant), or from
    ``{coordinate: exponent}``, ``Monomial({0: 2, 3: 1})``. It is immutable and hashable, prints
    as it parses, and has a stable ``repr``, so it can be a sweep's iterator value. Monomials
    sort by degree, then by their exponents.
    """

    __slots__ = ("_powers",)

    def __init__(self, spec: MonomialLike = "1"):
        if isinstance(spec, Monomial):
            powers = spec._powers
        elif isinstance(spec, str):
            powers = _parse(spec)
        elif isinstance(spec, Mapping):
            powers = _from_mapping(spec)
        else:
            raise TypeError(
                f"Monomial takes a string like 'x0^2*x3' or a dict {{0: 2, 3: 1}}, "
                f"got {type(spec).__name__}."
            )
        self._powers: tuple[tuple[int, int], ...] = powers

    @property
    def powers(self) -> dict[int, int]:
        """``{coordinate: exponent}`` for the coordinates that appear."""
        return dict(self._powers)

    @property
    def degree(self) -> int:
        """The total degree, the sum of the exponents."""
        return sum(e for _, e in self._powers)

    @property
    def max_coordinate(self) -> int:
        """The largest coordinate index used (-1 for the constant)."""
        return max((i for i, _ in self._powers), default=-1)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """Evaluate on whitened principal coordinates ``z`` of shape (n, d): shape (n,)."""
        if z.ndim != 2:
            raise ValueError(f"z must be (n_samples, d), got shape {tuple(z.shape)}.")
        if self.max_coordinate >= z.shape[1]:
            raise ValueError(
                f"{self} uses coordinate {self.max_coordinate} but the data has only "
                f"{z.shape[1]} dimensions."
            )
        out = torch.ones(z.shape[0], dtype=z.dtype, device=z.device)
        for i, e in self._powers:
            out = out * hermite(e, z[:, i])
        return out

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self._powers)

    def __str__(self) -> str:
        if not self._powers:
            return "1"
        return "*".join(f"x{i}" if e == 1 else f"x{i}^{e}" for i, e in self._powers)

    def __repr__(self) -> str:
        return f"Monomial('{self}')"

    def __hash__(self) -> int:
        return hash(self._powers)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            other = Monomial(other)
        if not isinstance(other, Monomial):
            return NotImplemented
        return self._powers == other._powers

    def __lt__(self, other: Monomial) -> bool:
        return (self.degree, self._powers) < (other.degree, other._powers)

    def __reduce__(self):
        return (Monomial, (str(self),))


def _from_mapping(spec: Mapping[int, int]) -> tuple[tuple[int, int], ...]:
    powers = []
    for i, e in spec.items():
        if int(i) != i or int(e) != e or i < 0 or e < 0:
            raise ValueError(f"Monomial {dict(spec)}: coordinates and exponents must be ints >= 0.")
        if e > 0:
            powers.append((int(i), int(e)))
    return tuple(sorted(powers))


def _parse(text: str) -> tuple[tuple[int, int], ...]:
    text = text.replace(" ", "")
    if text in ("", "1"):
        return ()
    powers: dict[int, int] = {}
    for factor in text.split("*"):
        match = _FACTOR.match(factor)
        if match is None:
            raise ValueError(
                f"cannot parse monomial {text!r}: factor {factor!r} is not of the form "
                "x<index> or x<index>^<exponent> (example: 'x0^2*x3')."
            )
        i, e = int(match.group(1)), int(match.group(2) or 1)
        powers[i] = powers.get(i, 0) + e
    return _from_mapping(powers)
