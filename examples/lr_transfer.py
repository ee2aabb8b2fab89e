"""Learning-rate transfer: under muP the best LR stays put as the width grows; under SP it moves.

Sweeps PARAMETRIZATION x WIDTH x LR on one fixed small task (a 2-hidden-layer ReLU MLP learning
``y = x0 * x1 + x2`` from Gaussian inputs with SGD), plots the final test loss against LR, one
line per width and one panel per parametrization, saves the plot and prints the best LR per
width. The defaults run on a laptop CPU in about a minute; every hyperparameter flag works, and
the list-valued ones set the grid:

    python examples/lr_transfer.py
    python examples/lr_transfer.py --WIDTH 128 512 2048 8192 --MAX_ITER 1000 --DEVICES 0
    python examples/lr_transfer.py --OPTIMIZER Adam --LR 1e-3 3e-3 1e-2 3e-2 0.1 0.3 1 3
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from modelscape import parse_args
from modelscape.backend.job_iterator import main as run_sweep

DEFAULTS = {  # this script's defaults: every flag overrides them, --help shows them
    "PARAMETRIZATION": ["sp", "mup"],
    "WIDTH": [64, 256, 1024],
    "LR": [2.0**k for k in range(-8, 3)],
    "MAX_ITER": 100,
    "N_SAMPLES": 64,
    "N_TEST": 1000,
    "LOSS_CHECKPOINTS": [0.0],  # never crossed: every job trains exactly MAX_ITER steps
    "DEVICES": ["cpu"],
}
EXTRA = {
    "OUT": ("runs/lr_transfer.png", "where to save the plot"),
    "TASK_DIM": (16, "input dimension of the task"),
}


def task_bfn(bsz, gen, X=None, y=None, TASK_DIM=16, **kwargs):
    """Gaussian inputs in TASK_DIM dimensions; target x0 * x1 + x2 (unit-order variance)."""

    def batch_fn(step):
        Xb = torch.randn(bsz, TASK_DIM, generator=gen, device=gen.device)
        return Xb, Xb[:, 0] * Xb[:, 1] + Xb[:, 2]

    return batch_fn


def as_list(value) -> list:
    return list(value) if isinstance(value, list) else [value]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, extra=EXTRA, defaults=DEFAULTS)
    config = vars(args)
    # the grid's axes, in this order; taken out of the config, which would otherwise hold them too
    axes = {name: as_list(config.pop(name)) for name in ("PARAMETRIZATION", "WIDTH", "LR")}
    result = run_sweep(list(axes.values()), list(axes), config, {"base_bfn": task_bfn})
    df = result.to_dataframe()
    df["loss"] = df["test_loss"].where(df["status"] == "ok")  # diverged runs have no loss
    best = best_lrs(df)
    print(best.to_string(index=False, float_format="%.4g"))
    plot(df, best, args.OUT)
    print(f"plot written to {args.OUT}")
    return 0


def best_lrs(df: pd.DataFrame) -> pd.DataFrame:
    """The LR with the lowest test loss for each (parametrization, width)."""
    rows = []
    for (param, width), group in df.groupby(["PARAMETRIZATION", "WIDTH"], sort=False):
        ok = group.dropna(subset=["loss"])
        best = ok.loc[ok["loss"].idxmin()] if len(ok) else None
        rows.append({
            "PARAMETRIZATION": param,
            "WIDTH": width,
            "best_LR": np.nan if best is None else best["LR"],
            "test_loss": np.nan if best is None else best["loss"],
        })  # fmt: skip
    return pd.DataFrame(rows)


def plot(df: pd.DataFrame, best: pd.DataFrame, path: str) -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    params = list(dict.fromkeys(df["PARAMETRIZATION"]))
    widths = sorted(df["WIDTH"].unique())
    colors = colormaps["plasma"](np.linspace(0.0, 0.85, len(widths)))
    fig = Figure(figsize=(4.2 * len(params), 3.4))
    axes = fig.subplots(1, len(params), squeeze=False, sharey=True)[0]
    for ax, param in zip(axes, params):
        for color, width in zip(colors, widths):
            line = df[(df["PARAMETRIZATION"] == param) & (df["WIDTH"] == width)].sort_values("LR")
            ax.plot(line["LR"], line["loss"], "o-", ms=3, color=color, label=f"width {width}")
            star = best[(best["PARAMETRIZATION"] == param) & (best["WIDTH"] == width)]
            ax.plot(star["best_LR"], star["test_loss"], "*", ms=12, color=color)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("LR")
        ax.set_title(param)
    axes[0].set_ylabel("test loss after MAX_ITER steps")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
