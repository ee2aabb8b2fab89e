"""Coordinate checks: does a parametrization keep per-coordinate sizes constant in width?

``coord_check`` builds one model per width, trains each for a few steps on a fixed random batch
and records, for every weight layer, the mean absolute entry of its output and of that output's
change since initialization (plus the readout's input, the last hidden features). Under muP the
changes stay flat in width; under SP the output change grows with width, under NTP the hidden
change shrinks. ``plot_coord_check`` draws the table on log-log axes, one panel per layer, and
``coord_slopes`` fits the log-log slope. Run it on your own model before a big sweep:

    df = coord_check("my_model.py:Net", params=["sp", "mup"], optimizer="Adam", lr=0.01)
    plot_coord_check(df).savefig("coord.png")

The same from the shell: ``python -m modelscape coord-check --params sp mup --out coord.png``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from modelscape.engine import resolve_class
from modelscape.engine.setup import seeded_global_rng
from modelscape.models import parametrize
from modelscape.models.builtin import (
    ACTIVATIONS,
    constructor_kwargs,
    resolve_model_class,
    standard_kwargs,
)

if TYPE_CHECKING:  # pandas loads on first use: `import modelscape` stays light
    import pandas as pd

DEFAULT_WIDTHS = (128, 256, 512, 1024, 2048)
FEATURES = "features"  # role of the readout's input, the last hidden activations


def coord_check(
    model: Any = "MLP",
    widths: Sequence[int] = DEFAULT_WIDTHS,
    *,
    params: Sequence[str] = ("sp", "mup"),
    optimizer: str | type[torch.optim.Optimizer] = "SGD",
    lr: float = 0.1,
    steps: int = 3,
    seeds: int = 2,
    batch_size: int = 64,
    in_shape: Sequence[int] = (16,),
    d_out: int = 4,
    depth: int = 2,
    nonlinearity: str = "relu",
    bias: bool = False,
    opt_kwargs: Mapping[str, Any] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Train each width for ``steps`` steps under each parametrization; return a long table.

    ``model`` is a built-in name (``"MLP"``, ``"CNN"``, ...), ``"file.py:ClassName"``, a model
    class (built with the same keyword matching as the engine: ``width``, ``depth``, ``d_in``,
    ``in_shape``, ``d_out``, ``nonlinearity``, ``bias`` and ``model_kwargs``), or a function
    ``width -> nn.Module``. Inputs are standard Gaussian of shape ``(batch_size, *in_shape)``,
    targets standard Gaussian of shape ``(batch_size, d_out)``, the loss is MSE, and the
    optimizer gets ``lr`` through ``parametrize.apply`` exactly as a sweep job would.

    Columns: ``param, optimizer, width, seed, step, layer, role, quantity, size``. ``quantity``
    is ``"activation"`` (mean |h_t|) or ``"change"`` (mean |h_t - h_0|, from step 1 on);
    ``layer`` is a module path, or ``"<readout>:input"`` for the last hidden features.
    """
    opt_cls = resolve_class(optimizer, torch.optim, "optimizer")
    build = _builder(model, in_shape, d_out, depth, nonlinearity, bias, model_kwargs or {})
    rows: list[dict[str, Any]] = []
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        X = torch.randn(batch_size, *in_shape, generator=gen)
        y = torch.randn(batch_size, d_out, generator=gen)
        for width in widths:
            for param in params:
                with seeded_global_rng(seed, torch.device("cpu")):
                    net = build(int(width))
                    opt = parametrize.apply(net, param, opt_cls, lr, dict(opt_kwargs or {}))
                key = {
                    "param": param,
                    "optimizer": opt_cls.__name__,
                    "width": int(width),
                    "seed": seed,
                }
                rows += [{**key, **r} for r in _train_and_record(net, opt, X, y, steps)]
    import pandas as pd

    return pd.DataFrame(rows)


def _train_and_record(
    net: nn.Module, opt: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor, steps: int
) -> list[dict[str, Any]]:
    layers = parametrize.weight_layers(net)
    if not layers:
        raise ValueError(f"{type(net).__name__} has no nn.Linear/nn.Conv2d layer to record.")
    roles = {name: "hidden" for name, _ in layers}
    roles[layers[0][0]], roles[layers[-1][0]] = "readin", "readout"
    readout_name, readout = layers[-1]
    features = f"{readout_name}:input"
    roles[features] = FEATURES
    captured: dict[str, torch.Tensor] = {}

    def keep_output(name: str) -> Callable:
        def hook(module, inputs, output):
            captured[name] = output.detach().float()

        return hook

    def keep_input(module, inputs):
        captured[features] = inputs[0].detach().float()

    # hooks live only for this window, so the caller's model is left clean
    handles = [m.register_forward_hook(keep_output(name)) for name, m in layers]
    handles.append(readout.register_forward_pre_hook(keep_input))
    rows: list[dict[str, Any]] = []
    try:
        initial: dict[str, torch.Tensor] = {}
        for step in range(steps + 1):
            if step > 0:
                loss = nn.functional.mse_loss(net(X), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            captured.clear()
            with torch.no_grad():
                net(X)
            if step == 0:
                initial = dict(captured)
            for name, h in captured.items():
                row = {"step": step, "layer": name, "role": roles[name]}
                rows.append({**row, "quantity": "activation", "size": h.abs().mean().item()})
                if step > 0:
                    change = (h - initial[name]).abs().mean().item()
                    rows.append({**row, "quantity": "change", "size": change})
    finally:
        for handle in handles:
            handle.remove()
    return rows


def coord_slopes(
    df: pd.DataFrame, quantity: str = "change", step: int | None = None
) -> pd.DataFrame:
    """The log-log slope of size against width for each (param, optimizer, layer, role).

    Sizes are averaged over seeds first; ``step`` defaults to the last step in the table. A
    slope near 0 means the coordinate size is stable in width (what muP promises for changes).
    """
    step = int(df["step"].max()) if step is None else step
    sub = df[(df["quantity"] == quantity) & (df["step"] == step)]
    keys = ["param", "optimizer", "layer", "role"]
    means = sub.groupby(keys + ["width"], sort=False)["size"].mean().reset_index()
    out = []
    for key, group in means.groupby(keys, sort=False):
        slope = np.polyfit(np.log(group["width"]), np.log(group["size"]), 1)[0]
        out.append({**dict(zip(keys, key)), "slope": float(slope)})
    import pandas as pd

    return pd.DataFrame(out)


def plot_coord_check(df: pd.DataFrame, quantity: str = "change", title: str | None = None):
    """A figure of size against width (log-log): one row per (param, optimizer), one panel per
    layer, one line per training step (mean over seeds). Returns the matplotlib Figure."""
    # a bare Figure (no pyplot): no global backend state, and savefig works headless
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    sub = df[df["quantity"] == quantity]
    if sub.empty:
        raise ValueError(f"no rows with quantity={quantity!r}; the table has {set(df.quantity)}.")
    row_keys = list(dict.fromkeys(zip(sub["param"], sub["optimizer"])))
    layers = list(dict.fromkeys(sub["layer"]))
    steps = sorted(sub["step"].unique())
    fig = Figure(figsize=(2.8 * len(layers), 2.5 * len(row_keys)))
    axes = fig.subplots(len(row_keys), len(layers), squeeze=False, sharex=True, sharey="col")
    colors = colormaps["viridis"](np.linspace(0.0, 0.9, len(steps)))
    for i, (param, opt_name) in enumerate(row_keys):
        rows = sub[(sub["param"] == param) & (sub["optimizer"] == opt_name)]
        for j, layer in enumerate(layers):
            ax = axes[i][j]
            cells = rows[rows["layer"] == layer]
            for color, step in zip(colors, steps):
                line = cells[cells["step"] == step].groupby("width")["size"].mean()
                ax.plot(line.index, line.values, "o-", color=color, ms=3, label=f"step {step}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            role = cells["role"].iloc[0] if len(cells) else ""
            ax.set_title(f"{param} ({opt_name}): {layer}\n[{role}]", fontsize=8)
            if i == len(row_keys) - 1:
                ax.set_xlabel("width")
            if j == 0:
                ax.set_ylabel(f"mean |{'Δh' if quantity == 'change' else 'h'}|")
            ax.tick_params(labelsize=7)
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(title or f"coordinate check: {quantity} of each layer's output vs width")
    fig.tight_layout()
    return fig


def _builder(
    model: Any,
    in_shape: Sequence[int],
    d_out: int,
    depth: int,
    nonlinearity: str,
    bias: bool,
    model_kwargs: Mapping[str, Any],
) -> Callable[[int], nn.Module]:
    """A function width -> model, from a name/class/file spec or a user function."""
    if callable(model) and not isinstance(model, type):
        return model
    cls = resolve_model_class(model)

    def build(width: int) -> nn.Module:
        provided = standard_kwargs(in_shape, d_out, width, depth, nonlinearity, bias)
        return cls(**constructor_kwargs(cls, {**provided, **model_kwargs}, {}))

    return build


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(
        name,
        help="coordinate check: per-layer change sizes against width, plotted log-log",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", default="MLP", help="MLP, CNN, ResNet, Transformer or file.py:Class")
    p.add_argument("--widths", nargs="+", type=int, default=list(DEFAULT_WIDTHS))
    p.add_argument(
        "--params", nargs="+", default=["sp", "mup"], choices=parametrize.PARAMETRIZATIONS
    )
    p.add_argument("--optimizer", default="SGD", help="a torch.optim name (SGD, Adam, AdamW)")
    p.add_argument("--lr", type=float, default=0.1, help="base learning rate")
    p.add_argument("--steps", type=int, default=3, help="training steps per model")
    p.add_argument("--seeds", type=int, default=2, help="seeds averaged per width")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--in-shape", nargs="+", type=int, default=[16], help="e.g. 3 8 8 for a CNN")
    p.add_argument(
        "--d-out", type=int, default=4, help="outputs per sample (more of them average out noise)"
    )
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--nonlinearity", default="relu", choices=list(ACTIVATIONS))
    p.add_argument("--bias", action="store_true", help="layers with biases")
    p.add_argument("--quantity", default="change", choices=["change", "activation"])
    p.add_argument("--out", default="coord_check.png", help="where to write the plot")
    p.add_argument("--csv", default=None, help="also write the long-form table here")


def run(args: argparse.Namespace, rest: Sequence[str]) -> int:
    if rest:
        raise SystemExit(f"coord-check: unknown arguments {' '.join(rest)}")
    try:
        df = coord_check(
            args.model,
            args.widths,
            params=args.params,
            optimizer=args.optimizer,
            lr=args.lr,
            steps=args.steps,
            seeds=args.seeds,
            batch_size=args.batch_size,
            in_shape=args.in_shape,
            d_out=args.d_out,
            depth=args.depth,
            nonlinearity=args.nonlinearity,
            bias=args.bias,
        )
    except (parametrize.ParametrizationError, ValueError) as err:
        # a model the parametrization does not cover, or inputs of the wrong shape
        print(f"coord-check: {err}", file=sys.stderr)
        return 2
    if args.csv:
        df.to_csv(args.csv, index=False)
    fig = plot_coord_check(df, args.quantity)
    fig.savefig(args.out, dpi=120)
    print(coord_slopes(df, args.quantity).to_string(index=False, float_format="%.3f"))
    print(f"plot written to {args.out}")
    return 0
