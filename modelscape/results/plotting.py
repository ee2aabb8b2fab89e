"""Plots of sweep results: learning curves, time to threshold, loss against step.

Every helper takes a ``Result`` (or the ``xarray.Dataset`` from ``Result.to_xarray()``), draws on
``ax`` (a new figure when ``None``) and returns the axes; ``save`` writes the figure. Axes are
named as in the sweep (``ntrain``, ``trial``, ``GAMMA``...); a hyperparameter name that an axis
aliases works too (``x="N_SAMPLES"`` finds the ``ntrain`` axis). Means and error bars (one
standard deviation) are taken over the ``trial`` axis; any other axis must be the x axis, the
``hue`` or have one value (select with ``ds.sel(...)`` first).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.figure
import matplotlib.pyplot as plt
import numpy as np
import xarray as xr
from matplotlib.axes import Axes

from modelscape.results.result import Result
from modelscape.sweep.jobs import AXIS_ALIASES, TRIAL_AXIS


def as_dataset(data: Result | xr.Dataset) -> xr.Dataset:
    """The ``xarray.Dataset`` of a result (passed through if it already is one)."""
    if isinstance(data, xr.Dataset):
        return data
    if isinstance(data, Result):
        return data.to_xarray()
    raise TypeError(f"expected a Result or an xarray.Dataset, got {type(data).__name__}.")


def resolve_dim(ds: xr.Dataset | xr.DataArray, name: str) -> str:
    """The dimension called ``name``, or the axis that aliases it (``N_SAMPLES`` -> ``ntrain``)."""
    if name in ds.dims:
        return name
    for alias, target in AXIS_ALIASES.items():
        if target == name and alias in ds.dims:
            return alias
    raise KeyError(f"no axis {name!r}; the result's axes are {', '.join(map(str, ds.dims))}.")


def resolve_variable(ds: xr.Dataset, name: str) -> str:
    """A data variable by name, accepting ``losses``/``train_losses`` for the loss variables."""
    aliases = {"losses": "test_loss", "train_losses": "train_loss"}
    name = aliases.get(name, name)
    if name not in ds.data_vars:
        numeric = [v for v in ds.data_vars if v != "status"]
        raise KeyError(f"no variable {name!r}; choose one of {', '.join(map(str, numeric))}.")
    return name


def _plotted_dims(ds: xr.Dataset, *names: str | None) -> list[str | None]:
    """The dims drawn as x axis or hue; the trial axis is averaged, so it cannot be one."""
    dims = [resolve_dim(ds, n) if n is not None else None for n in names]
    if TRIAL_AXIS in dims:
        raise ValueError(
            f"the {TRIAL_AXIS} axis cannot be the x axis or hue: trials are averaged for error "
            "bars; choose another axis."
        )
    return dims


def _reduce(da: xr.DataArray, keep: Sequence[str], what: str) -> tuple[xr.DataArray, xr.DataArray]:
    """Mean and std over trials, after checking that only ``keep`` dims remain."""
    stray = [d for d in da.dims if d not in keep and d != TRIAL_AXIS and da.sizes[d] > 1]
    if stray:
        raise ValueError(
            f"{what}: axes {stray} have several values; pass one as hue= or select a value "
            f"first (ds.sel({stray[0]}=...))."
        )
    da = da.squeeze([d for d in da.dims if d not in keep and d != TRIAL_AXIS], drop=True)
    if TRIAL_AXIS in da.dims:
        return da.mean(TRIAL_AXIS, skipna=True), da.std(TRIAL_AXIS, skipna=True)
    return da, xr.zeros_like(da)


def _new_axes(ax: Axes | None) -> Axes:
    if ax is not None:
        return ax
    _, ax = plt.subplots(figsize=(5, 3.6), constrained_layout=True)
    return ax


def _x_values(da: xr.DataArray, dim: str) -> tuple[np.ndarray, list[str] | None]:
    values = da[dim].values
    if np.issubdtype(values.dtype, np.number):
        return values.astype(float), None
    return np.arange(len(values), dtype=float), [str(v) for v in values]


def _draw_lines(
    ax: Axes,
    mean: xr.DataArray,
    err: xr.DataArray,
    x: str,
    hue: str | None,
    logx: bool,
    logy: bool,
) -> None:
    groups = [(None, mean, err)]
    if hue is not None:
        groups = [(f"{hue}={v}", mean.sel({hue: v}), err.sel({hue: v})) for v in mean[hue].values]
    labels = None
    for label, m, e in groups:
        xs, labels = _x_values(m, x)
        ax.errorbar(
            xs, m.values, yerr=np.nan_to_num(e.values), marker="o", ms=4, capsize=3, label=label
        )
    if labels is not None:
        ax.set_xticks(np.arange(len(labels)), labels, rotation=45, ha="right")
    elif logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if hue is not None:
        ax.legend(fontsize="small")


def learning_curve(
    data: Result | xr.Dataset,
    x: str = "N_SAMPLES",
    y: str = "test_loss",
    *,
    hue: str | None = None,
    ax: Axes | None = None,
    logx: bool = True,
    logy: bool = True,
) -> Axes:
    """``y`` (a loss or a scalar grab) against the axis ``x``, mean +- std over trials."""
    ds = as_dataset(data)
    var = resolve_variable(ds, y)
    xdim, hdim = _plotted_dims(ds, x, hue)
    da = ds[var]
    if "step" in da.dims:
        da = da.isel(step=-1)  # whole curves were recorded: the final value
    keep = [xdim] + ([hdim] if hdim else [])
    mean, err = _reduce(da, keep, f"learning_curve(x={x!r})")
    ax = _new_axes(ax)
    _draw_lines(ax, mean, err, xdim, hdim, logx, logy)
    ax.set_xlabel(xdim)
    ax.set_ylabel(var)
    return ax


def time_to_threshold(
    data: Result | xr.Dataset,
    x: str,
    *,
    threshold: float | None = None,
    hue: str | None = None,
    ax: Axes | None = None,
    logx: bool = True,
    logy: bool = True,
) -> Axes:
    """Steps until the EMA train loss first fell below ``threshold`` (default: the largest),
    against the axis ``x``, mean +- std over trials. Jobs that never reached it are left out."""
    ds = as_dataset(data)
    if "timekeys" not in ds:
        raise KeyError("the result has no timekeys (no LOSS_CHECKPOINTS were recorded).")
    tk = ds["timekeys"]
    if "threshold" in tk.coords:
        thresholds = [float(t) for t in tk["threshold"].values]
        if threshold is None:
            threshold = max(thresholds)
        if not any(np.isclose(threshold, t) for t in thresholds):
            raise KeyError(f"threshold {threshold} was not recorded; thresholds: {thresholds}.")
        tk = tk.sel(threshold=threshold, method="nearest")
    else:
        tk = tk.isel(threshold=0)
    xdim, hdim = _plotted_dims(ds, x, hue)
    keep = [xdim] + ([hdim] if hdim else [])
    mean, err = _reduce(tk, keep, f"time_to_threshold(x={x!r})")
    if not np.isfinite(mean.values).any():  # else matplotlib fails on an empty log scale
        reached = f"threshold {threshold:g}" if threshold is not None else "the threshold"
        raise ValueError(
            f"no job reached {reached}: there are no times to plot; choose a larger threshold."
        )
    ax = _new_axes(ax)
    _draw_lines(ax, mean, err, xdim, hdim, logx, logy)
    ax.set_xlabel(xdim)
    ax.set_ylabel(f"steps to EMA loss < {threshold:g}" if threshold is not None else "steps")
    return ax


def loss_vs_step(
    data: Result | xr.Dataset,
    y: str = "train_loss",
    *,
    hue: str | None = None,
    ax: Axes | None = None,
    logy: bool = True,
) -> Axes:
    """A curve recorded with ``ONLYTHRESHOLDS=False`` (``train_loss``, ``test_loss`` or a grab)
    against the step, mean over trials with a one-std band."""
    ds = as_dataset(data)
    var = resolve_variable(ds, y)
    da = ds[var]
    if "step" not in da.dims:
        raise ValueError(
            f"{var} has no step axis: run the sweep with ONLYTHRESHOLDS=False to record curves."
        )
    (hdim,) = _plotted_dims(ds, hue)
    keep = ["step"] + ([hdim] if hdim else [])
    mean, err = _reduce(da, keep, "loss_vs_step")
    ax = _new_axes(ax)
    groups = [(None, mean, err)]
    if hdim is not None:
        groups = [
            (f"{hdim}={v}", mean.sel({hdim: v}), err.sel({hdim: v})) for v in mean[hdim].values
        ]
    for label, m, e in groups:
        steps = np.arange(m.sizes["step"])
        (line,) = ax.plot(steps, m.values, label=label)
        ax.fill_between(
            steps, m.values - e.values, m.values + e.values, alpha=0.2, color=line.get_color()
        )
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(var)
    if hdim is not None:
        ax.legend(fontsize="small")
    return ax


def loglog_fit(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    *,
    labels: Sequence[Any] | None = None,
    ax: Axes | None = None,
) -> tuple[Axes, float]:
    """Scatter ``y`` against ``x`` on log-log axes with the least-squares line of
    ``log y`` on ``log x``; returns the axes and the fitted slope. Non-finite or non-positive
    points are left out of both."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if ok.sum() < 2:
        raise ValueError("loglog_fit needs at least two finite positive points.")
    slope, intercept = np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)
    ax = _new_axes(ax)
    ax.scatter(x[ok], y[ok], zorder=3)
    if labels is not None:
        for xi, yi, label, keep in zip(x, y, labels, ok):
            if keep:
                ax.annotate(
                    str(label), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8
                )
    grid = np.geomspace(x[ok].min(), x[ok].max(), 50)
    ax.plot(grid, np.exp(intercept) * grid**slope, "--", color="gray", label=f"slope {slope:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    return ax, float(slope)


def save(ax_or_fig: Axes | matplotlib.figure.Figure, path: str | os.PathLike) -> Path:
    """Write the figure to ``path`` (parent folders are created) and close it."""
    fig = ax_or_fig.figure if isinstance(ax_or_fig, Axes) else ax_or_fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
