"""Parametrizations (sp, ntp, mup, mfp, ntp-lr, mup-lr). Placeholder: only sp for now."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def apply(
    model: nn.Module,
    param: str,
    optimizer_cls: type[torch.optim.Optimizer],
    lr: float,
    opt_kwargs: dict[str, Any],
) -> torch.optim.Optimizer:
    """Rescale ``model`` in place for ``param`` and return its optimizer with per-layer groups."""
    if param != "sp":
        raise NotImplementedError(f"PARAMETRIZATION={param!r} is not implemented yet.")
    return optimizer_cls(model.parameters(), lr=lr, **opt_kwargs)
