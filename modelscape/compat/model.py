"""The original's ``modelscape.model``: its model classes and the centering wrapper.

``MLP`` is the library's own (``modelscape.models.MLP``, with the original's layer names). The
sweep centers models itself (CENTER); ``CenteredWrapper`` is for a user's own training code.
``SimpleCNN`` and ``SimpleTransformer`` are the original's small architectures; in a sweep they
take the data's shape from ``in_shape`` (the original read it from ``in_channels``/``img_size``
and ``DIM``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from modelscape.models.builtin import MLP

__all__ = [
    "MLP",
    "CenteredWrapper",
    "SimpleCNN",
    "SimpleMLPBlock",
    "SimpleSelfAttention",
    "SimpleTransformer",
    "SimpleTransformerBlock",
    "centeredmodel",
]


class CenteredWrapper(nn.Module):
    """``model(x) - baseline(x)``, where ``baseline`` is a frozen copy of ``model`` taken now."""

    def __init__(self, model: nn.Module, baseline_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.baseline = copy.deepcopy(model).requires_grad_(False).eval()
        self._baseline_dtype = baseline_dtype
        if baseline_dtype is not None:
            self.baseline.to(dtype=baseline_dtype)

    @torch.no_grad()
    def recenter(self) -> None:
        """Make the current weights the new (frozen) baseline."""
        self.baseline.load_state_dict(self.model.state_dict())
        if self._baseline_dtype is not None:
            self.baseline.to(dtype=self._baseline_dtype)
        self.baseline.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        with torch.no_grad():
            base = self.baseline(x)
        return out - base


def centeredmodel(model: nn.Module, baseline_dtype: torch.dtype | None = None) -> nn.Module:
    """``CenteredWrapper(model)``: the model minus its frozen initial function."""
    return CenteredWrapper(model, baseline_dtype=baseline_dtype)


class SimpleCNN(nn.Module):
    """``depth`` 3x3 convolutions of ``width`` channels with ReLU, flattened into a linear
    readout. Layers: ``input_layer``, ``hidden_layers``, ``output_layer``. In a sweep the data's
    ``in_shape`` (C, H, W) sets ``in_channels`` and ``img_size``."""

    def __init__(
        self,
        in_channels: int = 1,
        img_size: int = 8,
        width: int = 16,
        depth: int = 2,
        d_out: int = 1,
        bias: bool = True,
        *,
        in_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        if depth < 2:
            raise ValueError("SimpleCNN depth must be >= 2")
        if in_shape is not None:
            if len(in_shape) != 3 or in_shape[1] != in_shape[2]:
                raise ValueError(f"SimpleCNN takes square images (C, H, H), got {tuple(in_shape)}.")
            in_channels, img_size = int(in_shape[0]), int(in_shape[1])
        self.in_channels, self.img_size = in_channels, img_size
        self.width, self.depth, self.d_out = width, depth, d_out
        self.input_layer = nn.Conv2d(in_channels, width, 3, padding=1, bias=bias)
        self.hidden_layers = nn.ModuleList(
            nn.Conv2d(width, width, 3, padding=1, bias=bias) for _ in range(depth - 1)
        )
        self.output_layer = nn.Linear(width * img_size * img_size, d_out, bias=bias)
        self.nonlin = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.nonlin(self.input_layer(x))
        for layer in self.hidden_layers:
            h = self.nonlin(layer(h))
        return self.output_layer(h.flatten(1))


class SimpleSelfAttention(nn.Module):
    """Single-head softmax self-attention with query/key/value/output projections."""

    def __init__(self, d_model: int, bias: bool = True):
        super().__init__()
        self.q = nn.Linear(d_model, d_model, bias=bias)
        self.k = nn.Linear(d_model, d_model, bias=bias)
        self.v = nn.Linear(d_model, d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return self.proj(torch.softmax(logits, dim=-1) @ v)


class SimpleMLPBlock(nn.Module):
    """``fc2(relu(fc1(x)))`` with a hidden size of ``mlp_mult * d_model``."""

    def __init__(self, d_model: int, mlp_mult: int = 4, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d_model, mlp_mult * d_model, bias=bias)
        self.fc2 = nn.Linear(mlp_mult * d_model, d_model, bias=bias)
        self.nonlin = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.nonlin(self.fc1(x)))


class SimpleTransformerBlock(nn.Module):
    """An MLP block then self-attention, without residuals or normalization (the original's)."""

    def __init__(self, d_model: int, mlp_mult: int = 4, bias: bool = True):
        super().__init__()
        self.mlp = SimpleMLPBlock(d_model, mlp_mult=mlp_mult, bias=bias)
        self.attn = SimpleSelfAttention(d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.mlp(x))


class SimpleTransformer(nn.Module):
    """Token embedding (``input_layer``), ``depth`` blocks (``hidden_layers``), mean pooling
    over positions and a linear ``output_layer``. Inputs are (n, T, d_in); in a sweep the data's
    ``in_shape`` (T, d_in) sets ``d_in``. Train it under PARAMETRIZATION='sp'."""

    def __init__(
        self,
        d_in: int = 8,
        width: int = 16,
        depth: int = 2,
        d_out: int = 1,
        mlp_mult: int = 4,
        bias: bool = True,
        seq_len: int | None = None,
        *,
        in_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError("SimpleTransformer depth must be >= 1")
        if in_shape is not None:
            if len(in_shape) != 2:
                raise ValueError(
                    f"SimpleTransformer takes sequences (n, T, d_in), got X.shape[1:] = "
                    f"{tuple(in_shape)}."
                )
            seq_len, d_in = int(in_shape[0]), int(in_shape[1])
        self.d_in, self.width, self.depth, self.d_out, self.seq_len = (
            d_in,
            width,
            depth,
            d_out,
            seq_len,
        )
        self.input_layer = nn.Linear(d_in, width, bias=bias)
        self.hidden_layers = nn.ModuleList(
            SimpleTransformerBlock(width, mlp_mult=mlp_mult, bias=bias) for _ in range(depth)
        )
        self.output_layer = nn.Linear(width, d_out, bias=bias)
        self.nonlin = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layer(x)
        for block in self.hidden_layers:
            h = block(h)
        return self.output_layer(h.mean(dim=1))
