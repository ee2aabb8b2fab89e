"""The original's ``modelscape.data.monomial``: its dict-style ``Monomial`` and the HEA
learning order, on top of ``modelscape.data.hermite.Monomial`` and ``modelscape.data.hea``.

The original's ``Monomial({0: 2, 3: 1})`` is a dict ``{coordinate: exponent}`` that prints as
``$x_{0}^2x_{3}$``; ``.to_modelscape()`` gives the library's ``Monomial("x0^2*x3")``, which
evaluates the normalized Hermite product.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from modelscape.compat.utils import ensure_numpy
from modelscape.data.hea import hea_eigenvalue, top_hea_monomials
from modelscape.data.hermite import Monomial as LibraryMonomial

LevelCoeff = Callable[[int], float]


class Monomial(dict):
    """``{coordinate: exponent}``, ordered by degree; hashable by content (do not mutate one
    that keys a dict or a sweep)."""

    def __lt__(self, other: Monomial) -> bool:
        return self.degree() < other.degree()

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def degree(self) -> int:
        return int(sum(self.values()))

    def max_degree(self) -> int:
        return int(max(self.values(), default=0))

    def copy(self) -> Monomial:
        return Monomial(self)

    def __str__(self) -> str:
        if self.degree() == 0:
            return "1"
        parts = [f"x_{{{i}}}" + (f"^{e}" if e > 1 else "") for i, e in self.items()]
        return "$" + "".join(parts) + "$"

    def __repr__(self) -> str:
        return str(self)

    def to_modelscape(self) -> LibraryMonomial:
        """The library's ``Monomial`` with the same exponents."""
        return LibraryMonomial({int(i): int(e) for i, e in self.items() if e})

    @classmethod
    def from_modelscape(cls, m: LibraryMonomial) -> Monomial:
        return cls(m.powers)

    @classmethod
    def from_repr(cls, s: str) -> Monomial:
        """Parse the printed form, ``'$x_{0}^2x_{3}$'`` or ``'$1$'``."""
        if not isinstance(s, str):
            raise TypeError("from_repr expects a string")
        text = s.strip().strip("$").replace(" ", "")
        if text in ("", "1"):
            return cls()
        out: dict[int, int] = {}
        for factor in text.split("x_")[1:]:
            if not factor.startswith("{") or "}" not in factor:
                raise ValueError(f"cannot parse monomial {s!r}")
            index, _, rest = factor[1:].partition("}")
            exp = int(rest[1:]) if rest.startswith("^") else 1
            if rest and not rest.startswith("^"):
                raise ValueError(f"cannot parse monomial {s!r}")
            out[int(index)] = out.get(int(index), 0) + exp
        return cls(out)

    def basis_factors(self, include_one: bool = False, canonical: bool = True) -> list[Monomial]:
        """Degree-one monomials whose product is this one (``[1]`` for the constant if asked)."""
        if self.degree() == 0:
            return [Monomial()] if include_one else []
        items = sorted(self.items()) if canonical else self.items()
        return [Monomial({i: 1}) for i, e in items for _ in range(int(e))]

    def basis(self, canonical: bool = True) -> dict[int, int]:
        items = sorted(self.items()) if canonical else self.items()
        return {i: int(e) for i, e in items if self.degree()}


def _coeffs(eval_level_coeff: LevelCoeff, max_degree: int) -> list[float]:
    return [float(eval_level_coeff(k)) for k in range(max_degree + 1)]


def compute_hea_eigval(data_eigvals: Any, monomial: dict, eval_level_coeff: LevelCoeff) -> float:
    """The HEA eigenvalue ``c_degree * prod_i gamma_i^e_i`` of one monomial."""
    m = Monomial(monomial)
    coeffs = _coeffs(eval_level_coeff, m.degree())
    return hea_eigenvalue(m.to_modelscape(), ensure_numpy(data_eigvals), coeffs)


def generate_hea_monomials(
    data_eigvals: Any, num_monomials: int, eval_level_coeff: LevelCoeff, kmax: int = 10, **_: Any
) -> tuple[np.ndarray, list[Monomial]]:
    """The constant, then the ``num_monomials - 1`` monomials of degree 1..``kmax`` with the
    largest HEA eigenvalues, largest first: ``(eigenvalues, monomials)``. ``data_eigvals`` must
    be sorted in decreasing order."""
    try:
        num_monomials = abs(int(num_monomials))
    except (TypeError, ValueError) as err:
        raise ValueError(f"num_monomials must be an int, got {num_monomials!r}") from err
    if num_monomials < 1:
        raise ValueError("num_monomials must be >= 1")
    coeffs = _coeffs(eval_level_coeff, kmax)
    first = coeffs[0]
    coeffs[0] = 0.0  # the constant leads by convention, whatever its eigenvalue
    monomials, values = [], np.zeros(0)
    if num_monomials > 1:
        monomials, values = top_hea_monomials(ensure_numpy(data_eigvals), num_monomials - 1, coeffs)
    return (
        np.concatenate([[first], values]),
        [Monomial()] + [Monomial.from_modelscape(m) for m in monomials],
    )


def get_monomial_targets(
    monomials: Sequence[Monomial], hea_eigvals: np.ndarray, n_markers: int = 20
) -> list[int]:
    """Indices of a spread of target monomials: a fixed list of low-degree ones that are present,
    plus ``n_markers`` of degree 1-3 at log-spaced eigenvalues from ``hea_eigvals[2000]`` up."""
    fixed = [{0: 1}, {10: 1}, {100: 1}, {190: 1}, {0: 2}, {0: 1, 1: 1}, {1: 1, 3: 1},
             {16: 1, 20: 1}, {20: 1, 30: 1}, {0: 3}, {0: 1, 1: 1, 2: 1}, {1: 1, 3: 1, 4: 1},
             {3: 2, 5: 1}, {0: 4}]  # fmt: skip
    chosen = {monomials.index(t) for t in fixed if t in monomials}
    if not chosen:
        raise ValueError("none of the fixed target monomials is among `monomials`.")
    hea_eigvals = np.asarray(hea_eigvals)
    degrees = np.array([m.degree() for m in monomials])
    markers = np.logspace(np.log10(hea_eigvals[2000]), np.log10(hea_eigvals[0]), n_markers)
    for i, marker in enumerate(markers):
        degree = i % 3 + 1
        candidates = np.flatnonzero(degrees == degree)
        if candidates.size:
            chosen.add(int(candidates[np.argmin(np.abs(hea_eigvals[candidates] - marker))]))
    return sorted(chosen)


def group_by_deg_max(
    monomials: Iterable[Monomial], stop_at_degree: int | None = None, assume_sorted: bool = False
) -> dict[tuple[int, int], list[tuple[int, Monomial]]]:
    """``{(degree, max exponent): [(index, monomial), ...]}``, up to ``stop_at_degree``."""
    groups: dict[tuple[int, int], list[tuple[int, Monomial]]] = {}
    for i, m in enumerate(monomials):
        if stop_at_degree is not None and m.degree() > stop_at_degree:
            if assume_sorted:
                break
            continue
        groups.setdefault((m.degree(), m.max_degree()), []).append((i, m))
    return groups
