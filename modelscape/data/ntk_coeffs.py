"""The original's ``modelscape.data.ntk_coeffs``: the ReLU NTK's level coefficients as a
function of the level, on top of ``modelscape.data.hea.relu_ntk_level_coefficients``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from modelscape.compat.utils import ensure_numpy
from modelscape.data.hea import relu_ntk_level_coefficients


def kernel_parse_kwargs(kwargs: Mapping[str, Any]) -> tuple[float, float]:
    """``(weight_variance, bias_variance)``: given as ``weight_variance``/``bias_variance`` or
    ``w_var``/``b_var``, else derived from ``kernel_width`` (default 1)."""
    if {"weight_variance", "bias_variance"} <= set(kwargs) or {"w_var", "b_var"} <= set(kwargs):
        w = kwargs.get("weight_variance", kwargs.get("w_var", 1))
        b = kwargs.get("bias_variance", kwargs.get("b_var", 1))
        return float(w), float(b)
    width = float(kwargs.get("kernel_width", 1.0))
    w = float(np.sqrt(2 * np.pi / (1 + 2 * np.pi * width)))
    return w, width * w


def get_relu_level_coeff_fn(data_eigvals: Any, **kwargs: Any) -> Callable[[int], float]:
    """``eval_level_coeff(level)``: the level coefficient ``c_level`` of a one-hidden-layer ReLU
    NTK for data with these covariance eigenvalues (variances as in ``kernel_parse_kwargs``),
    with the original's convention that ``c_0`` excludes the readout bias."""
    w, b = kernel_parse_kwargs(kwargs)
    gamma = ensure_numpy(data_eigvals)

    @functools.cache
    def coeffs(max_degree: int) -> np.ndarray:
        return relu_ntk_level_coefficients(
            gamma, max_degree, depth=1, weight_variance=w, bias_variance=b
        )

    def eval_level_coeff(level: int) -> float:
        value = float(coeffs(max(int(level), 8))[int(level)])
        # the original's c_0 leaves out the readout bias's variance, which the library adds
        return value - b if int(level) == 0 else value

    return eval_level_coeff
