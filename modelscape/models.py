"""Built-in models. Each takes ``d_in``, ``d_out``, ``width`` and ``depth`` by keyword.

The engine builds ``MODEL_CLASS`` (default ``MLP``) with keyword arguments matched by name:
``width``, ``depth``, ``d_in`` and ``d_out`` come from WIDTH, DEPTH and the data; any other
constructor argument is looked up in the config by its own name or its upper-case name.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from modelscape.jobs import SweepError

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "linear": nn.Identity,
}


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units, then a linear readout."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        width: int,
        depth: int,
        nonlinearity: str = "relu",
        bias: bool = False,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"MLP depth must be >= 1 hidden layer, got {depth}.")
        if nonlinearity not in ACTIVATIONS:
            raise ValueError(f"nonlinearity {nonlinearity!r} is not one of {list(ACTIVATIONS)}.")
        dims = [d_in] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(dims, dims[1:]))
        self.readout = nn.Linear(width, d_out, bias=bias)
        self.act = ACTIVATIONS[nonlinearity]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = self.act(layer(x))
        return self.readout(x)


def resolve_model_class(spec: Any) -> type[nn.Module]:
    """``None`` -> MLP; a class as is; ``"path/file.py:ClassName"`` loaded from the file; a
    built-in name (``"MLP"``) from this module."""
    if spec is None:
        return MLP
    if isinstance(spec, type):
        return spec
    if isinstance(spec, str) and ":" in spec:
        from modelscape.sweep import load_from_file

        path, name = spec.rsplit(":", 1)
        return load_from_file(path, name, "MODEL_CLASS")
    if isinstance(spec, str) and spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec]
    raise SweepError(
        f"MODEL_CLASS={spec!r}: give a class, 'path/to/file.py:ClassName' or one of "
        f"{', '.join(BUILTIN_MODELS)}."
    )


def constructor_kwargs(
    cls: type[nn.Module], provided: Mapping[str, Any], config: Mapping[str, Any]
) -> dict[str, Any]:
    """Match ``cls``'s constructor arguments by name; a missing required one is an error."""
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {}
    missing = []
    for name, p in list(params.items())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name in provided:
            kwargs[name] = provided[name]
        elif name in config:
            kwargs[name] = config[name]
        elif name.upper() in config:
            kwargs[name] = config[name.upper()]
        elif p.default is inspect.Parameter.empty:
            missing.append(name)
    if missing:
        raise SweepError(
            f"{cls.__name__}.__init__ needs {', '.join(missing)}: add "
            f"{' / '.join(m.upper() for m in missing)} to global_config (or make them "
            "iterator axes)."
        )
    return kwargs


BUILTIN_MODELS: dict[str, type[nn.Module]] = {"MLP": MLP}
