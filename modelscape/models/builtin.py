"""Built-in models: MLP (the default), CNN, ResNet and Transformer.

The engine builds ``MODEL_CLASS`` (default ``MLP``) with keyword arguments matched by name:
``width``, ``depth``, ``d_in`` (flattened feature count), ``in_shape`` (``X.shape[1:]``),
``d_out``, ``nonlinearity`` and ``bias`` come from WIDTH, DEPTH, NONLINEARITY, BIAS and the data;
any other constructor argument is looked up in the config by its own name or its upper-case
name (``heads`` <- ``HEADS``).

The MLP, CNN and ResNet are built from ``nn.Linear``/``nn.Conv2d`` only, so every
PARAMETRIZATION applies to them. The Transformer has attention and layer norms, which the
ntp/mup/mfp rules do not cover: it trains under ``sp`` only.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from modelscape.errors import SweepError
from modelscape.models.activations import ACTIVATIONS


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units, then a linear readout.

    The layers are the original's: ``input_layer`` (``d_in -> width``), ``hidden_layers``
    (``depth - 1`` layers ``width -> width``) and ``output_layer`` (``width -> d_out``), with the
    activation ``nonlin`` after every layer but the last. ``nonlinearity`` is a name
    (``"relu"``, ``"tanh"``, ...), an ``nn.Module``, or None for ReLU; ``forcezeros=True`` starts
    the readout at zero.
    """

    def __init__(
        self,
        d_in: int = 1,
        width: int = 4096,
        depth: int = 2,
        d_out: int = 1,
        bias: bool = True,
        nonlinearity: str | nn.Module | None = None,
        forcezeros: bool = False,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"MLP depth must be >= 1 hidden layer, got {depth}.")
        # a bad name fails before any weight is allocated
        act = nonlinearity if isinstance(nonlinearity, nn.Module) else _activation(nonlinearity)
        self.d_in, self.width, self.depth, self.d_out = d_in, width, depth, d_out
        self.input_layer = nn.Linear(d_in, width, bias=bias)
        self.hidden_layers = nn.ModuleList(
            nn.Linear(width, width, bias=bias) for _ in range(depth - 1)
        )
        self.output_layer = nn.Linear(width, d_out, bias=bias)
        self.nonlin = act
        if forcezeros:
            with torch.no_grad():
                self.output_layer.weight.zero_()
                if self.output_layer.bias is not None:
                    self.output_layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_activations(x)[1]

    def get_activations(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The activations after each hidden layer, and the output."""
        h = self.nonlin(self.input_layer(x.flatten(1)))
        acts = [h]
        for layer in self.hidden_layers:
            h = self.nonlin(layer(h))
            acts.append(h)
        return acts, self.output_layer(h)


def _activation(nonlinearity: str | None) -> nn.Module:
    if nonlinearity is None:
        return nn.ReLU()
    if nonlinearity not in ACTIVATIONS:
        raise ValueError(f"nonlinearity {nonlinearity!r} is not one of {list(ACTIVATIONS)}.")
    return ACTIVATIONS[nonlinearity]()


def _image_shape(in_shape: Sequence[int], model: str) -> tuple[int, int, int]:
    """(channels, height, width) of image inputs; (H, W) means one channel."""
    shape = tuple(int(s) for s in in_shape)
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    raise ValueError(
        f"{model} takes images: X of shape (n, C, H, W) or (n, H, W); got X.shape[1:] = "
        f"{shape}. Use MODEL_CLASS='MLP' for flat features."
    )


class CNN(nn.Module):
    """``depth`` 3x3 convolutions of ``width`` channels (same padding), global average pooling,
    then a linear readout. Inputs are images, ``(n, C, H, W)`` or ``(n, H, W)``."""

    prefers_channels_last = True  # its forward takes channels-last activations (CHANNELS_LAST)

    def __init__(
        self,
        in_shape: Sequence[int],
        d_out: int,
        width: int,
        depth: int,
        nonlinearity: str = "relu",
        bias: bool = False,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"CNN depth must be >= 1 convolution, got {depth}.")
        self.in_shape = _image_shape(in_shape, "CNN")
        chans = [self.in_shape[0]] + [width] * depth
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, padding=1, bias=bias) for a, b in zip(chans, chans[1:])
        )
        self.readout = nn.Linear(width, d_out, bias=bias)
        self.act = _activation(nonlinearity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.in_shape)
        for conv in self.convs:
            x = self.act(conv(x))
        return self.readout(x.mean(dim=(2, 3)))


class ResNet(nn.Module):
    """A 3x3 convolution stem, ``depth`` residual blocks ``x + (conv(act(conv(act(x)))) /
    sqrt(depth)``, global average pooling and a linear readout. No normalization layers, so
    every parametrization applies; the 1/sqrt(depth) branch scale keeps the residual stream's
    variance bounded in depth. Inputs are images, ``(n, C, H, W)`` or ``(n, H, W)``."""

    prefers_channels_last = True  # its forward takes channels-last activations (CHANNELS_LAST)

    def __init__(
        self,
        in_shape: Sequence[int],
        d_out: int,
        width: int,
        depth: int,
        nonlinearity: str = "relu",
        bias: bool = False,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"ResNet depth must be >= 1 residual block, got {depth}.")
        self.in_shape = _image_shape(in_shape, "ResNet")
        self.stem = nn.Conv2d(self.in_shape[0], width, 3, padding=1, bias=bias)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                _activation(nonlinearity),
                nn.Conv2d(width, width, 3, padding=1, bias=bias),
                _activation(nonlinearity),
                nn.Conv2d(width, width, 3, padding=1, bias=bias),
            )
            for _ in range(depth)
        )
        self.branch_scale = 1.0 / math.sqrt(depth)
        self.act = _activation(nonlinearity)
        self.readout = nn.Linear(width, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x.reshape(x.shape[0], *self.in_shape))
        for block in self.blocks:
            x = x + self.branch_scale * block(x)
        return self.readout(self.act(x).mean(dim=(2, 3)))


class Transformer(nn.Module):
    """A pre-norm Transformer encoder on sequences ``(n, T, d_token)``: a linear token embedding
    plus fixed sinusoidal positions, ``depth`` blocks of ``heads``-head self-attention and a
    ``4 * width`` MLP, a final layer norm, mean pooling over positions and a linear readout.

    Trains under PARAMETRIZATION='sp' only: attention and layer norms are outside the
    ntp/mup/mfp rules, and asking for them raises an error that says so.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        d_out: int,
        width: int,
        depth: int,
        nonlinearity: str = "gelu",
        bias: bool = False,
        heads: int = 4,
    ):
        super().__init__()
        if len(in_shape) != 2:
            raise ValueError(
                f"Transformer takes sequences: X of shape (n, T, d_token); got X.shape[1:] = "
                f"{tuple(in_shape)}."
            )
        if depth < 1:
            raise ValueError(f"Transformer depth must be >= 1 block, got {depth}.")
        if width % heads:
            raise ValueError(f"Transformer width {width} must be divisible by heads={heads}.")
        self.embed = nn.Linear(int(in_shape[1]), width, bias=bias)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width,
                heads,
                dim_feedforward=4 * width,
                dropout=0.0,
                activation=_activation(nonlinearity),
                batch_first=True,
                norm_first=True,
                bias=bias,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width, bias=bias)
        self.readout = nn.Linear(width, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + _sinusoidal_positions(x.shape[1], x.shape[2], x)
        for block in self.blocks:
            x = block(x)
        return self.readout(self.norm(x).mean(dim=1))


def _sinusoidal_positions(length: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """The fixed sine/cosine position code of "Attention is all you need", shape (T, dim)."""
    pos = torch.arange(length, dtype=like.dtype, device=like.device)[:, None]
    freq = torch.exp(
        torch.arange(0, dim, 2, dtype=like.dtype, device=like.device) * (-math.log(1e4) / dim)
    )
    code = torch.zeros(length, dim, dtype=like.dtype, device=like.device)
    code[:, 0::2] = torch.sin(pos * freq)
    code[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return code


def resolve_model_class(spec: Any) -> type[nn.Module]:
    """``None`` -> MLP; a class as is; ``"path/file.py:ClassName"`` loaded from the file; a
    built-in name (``"MLP"``) from this module."""
    if spec is None:
        return MLP
    if isinstance(spec, type):
        return spec
    if isinstance(spec, str) and ":" in spec:
        from modelscape.sweep.spec import load_from_file

        path, name = spec.rsplit(":", 1)
        return load_from_file(path, name, "MODEL_CLASS")
    if isinstance(spec, str) and spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec]
    raise SweepError(
        f"MODEL_CLASS={spec!r}: give a class, 'path/to/file.py:ClassName' or one of "
        f"{', '.join(BUILTIN_MODELS)}."
    )


def standard_kwargs(
    in_shape: Sequence[int], d_out: int, width: int, depth: int, nonlinearity: str, bias: bool
) -> dict[str, Any]:
    """The arguments any model may take by name, from the data's shape and the hyperparameters."""
    return {
        "d_in": int(math.prod(in_shape)),
        "in_shape": tuple(in_shape),
        "d_out": d_out,
        "width": width,
        "depth": depth,
        "nonlinearity": nonlinearity,
        "bias": bias,
    }


def constructor_kwargs(
    cls: type[nn.Module], provided: Mapping[str, Any], config: Mapping[str, Any]
) -> dict[str, Any]:
    """Match ``cls``'s constructor arguments by name; a missing required one is an error.

    ``provided`` (the standard arguments) wins; any other argument ``name`` comes from the
    config key ``NAME`` (upper case), the one spelling.
    """
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {}
    missing = []
    for name, p in list(params.items())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name in provided:
            kwargs[name] = provided[name]
        elif name.upper() in config:
            kwargs[name] = config[name.upper()]
        elif name in config and name != name.upper():
            raise SweepError(
                f"{cls.__name__}.__init__ takes {name!r}: give it as {name.upper()} (a model's "
                f"arguments are upper-case config keys), not {name!r}."
            )
        elif p.default is inspect.Parameter.empty:
            missing.append(name)
    if missing:
        raise SweepError(
            f"{cls.__name__}.__init__ needs {', '.join(missing)}: add "
            f"{' / '.join(m.upper() for m in missing)} to global_config (or make them "
            "iterator axes)."
        )
    return kwargs


BUILTIN_MODELS: dict[str, type[nn.Module]] = {
    "MLP": MLP,
    "CNN": CNN,
    "ResNet": ResNet,
    "Transformer": Transformer,
}
