"""The original's ``modelscape.data.mlp_grabs``: grabs for models with ``input_layer`` and
``output_layer`` (the built-in ``MLP``), and the empirical NTK."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from modelscape.compat.utils import ensure_numpy


def _weights(layer: nn.Module, detach: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    W, b = layer.weight, layer.bias
    if detach:
        return W.detach().clone(), None if b is None else b.detach().clone()
    return W, b


def get_Win(model: nn.Module, *, detach: bool = True, **_: Any):
    """``(weight, bias)`` of ``model.input_layer``."""
    return _weights(model.input_layer, detach)


def get_Wout(model: nn.Module, *, detach: bool = True, **_: Any):
    """``(weight, bias)`` of ``model.output_layer``."""
    return _weights(model.output_layer, detach)


def get_W_gram(W: torch.Tensor, concatenate_outside: bool = True, **_: Any) -> torch.Tensor:
    """``W^T W`` (``concatenate_outside``) or ``W W^T``."""
    return W.T @ W if concatenate_outside else W @ W.T


def get_W_ii(W: torch.Tensor, i: int | None = None, monomial: Any = None, **_: Any):
    """Diagonal entry ``i`` of a Gram matrix, or the entries at a monomial's coordinates."""
    if monomial is not None and i is None:
        return [W[k, k].item() for k in (int(c) for c in monomial.basis())]
    return W[i, i].item()


def get_W_trace(W: torch.Tensor, **_: Any) -> float:
    """The trace of a Gram matrix."""
    return torch.trace(W).item()


def empirical_ntk(model: nn.Module, X_tr: Any, create_graph: bool = False, **_: Any) -> np.ndarray:
    """The empirical NTK ``K_ij = <d f(x_i)/d theta, d f(x_j)/d theta>`` of a scalar-output
    model on the rows of ``X_tr`` (N, N), in eval mode."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    X = torch.as_tensor(X_tr, device=params[0].device, dtype=params[0].dtype)
    rows = []
    for i in range(X.shape[0]):
        out = model(X[i : i + 1]).squeeze()
        grads = torch.autograd.grad(out, params, create_graph=create_graph)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    J = torch.stack(rows)
    return ensure_numpy(J @ J.T)


def empirical_ntk_trace(model: nn.Module, X_tr: Any, create_graph: bool = False, **kw: Any):
    """The trace of ``empirical_ntk``."""
    return empirical_ntk(model, X_tr, create_graph=create_graph, **kw).trace()
