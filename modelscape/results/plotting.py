"""Plots of sweep results that show what happened: they draw what ``modelscape.analysis``
returns.

Every helper takes a ``Result``, a run folder or the ``xarray.Dataset`` from
``Result.to_xarray()``, draws on ``ax`` (a new figure when ``None``) and returns the axes;
``save`` writes the figure. Axes are named as in the sweep (``ntrain``, ``trial``, ``GAMMA``...);
a hyperparameter name that an axis aliases works too (``x="N_SAMPLES"`` finds ``ntrain``).
Statistics are taken over the ``trial`` axis; any other axis must be the x axis, the ``hue`` or
have one value (select with ``ds.sel(...)`` first).

- ``learning_curve``: a statistic over trials (``analysis.summarize``: median with a bootstrap
  interval by default) against an axis;
- ``time_to_threshold``: the Kaplan-Meier median steps to a loss (``analysis.time_to_threshold``),
  censored grid points marked, with the fraction of jobs that reached it;
- ``power_law_fit``: the data, the fitted power law and its bootstrap band
  (``analysis.fit_power_law``; ``draw_fit`` adds a fit to any axes);
- ``loss_vs_step``: each job's curve up to its exit step, evaluations as points, diverged jobs
  marked.

Every legend or axis label says which statistic and interval are drawn; on a log axis a band
never goes below zero, and where the x range is short the ticks sit at the swept values.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.figure
import matplotlib.pyplot as plt
import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

from modelscape import analysis
from modelscape.analysis import as_dataset, resolve_dim, resolve_variable
from modelscape.analysis.curves import exit_step, taken
from modelscape.results.result import Result
from modelscape.sweep.jobs import TRIAL_AXIS

__all__ = [
    "as_dataset",
    "learning_curve",
    "loglog_fit",
    "draw_fit",
    "loss_vs_step",
    "power_law_fit",
    "resolve_dim",
    "resolve_variable",
    "save",
    "time_to_threshold",
]

Data = Result | xr.Dataset | str | os.PathLike
SHORT_RANGE = 10**1.5  # below this ratio of x values, log ticks sit at the swept values
PLAIN = FuncFormatter(lambda v, _: f"{v:g}")


def _plotted_dims(ds: xr.Dataset, *names: str | None) -> list[str | None]:
    """The dims drawn as x axis or hue; the trial axis is summarized, so it cannot be one."""
    dims = [resolve_dim(ds, n) if n is not None else None for n in names]
    if TRIAL_AXIS in dims:
        raise ValueError(
            f"the {TRIAL_AXIS} axis cannot be the x axis or hue: trials are averaged for error "
            "bars; choose another axis."
        )
    return dims


def _only(ds: xr.Dataset, keep: Sequence[str | None], what: str) -> xr.Dataset:
    """``ds`` without the axes of one value, after checking that only ``keep`` (and the trials,
    thresholds and steps) have several."""
    keep = {k for k in keep if k} | {TRIAL_AXIS, "threshold", "step"}
    stray = [d for d in ds.dims if d not in keep and ds.sizes[d] > 1]
    if stray:
        raise ValueError(
            f"{what}: axes {stray} have several values; pass one as hue= or select a value "
            f"first (ds.sel({stray[0]}=...))."
        )
    return ds.squeeze([d for d in ds.dims if d not in keep], drop=True)


def _status_note(ds: xr.Dataset) -> str:
    """A line naming the jobs that did not finish well (a plot marks them, never hides them):
    diverged jobs enter the statistics (as never reaching, or +inf), the others are left out."""
    if "status" not in ds:
        return ""
    status = ds["status"].values.ravel()
    parts = [f"{(status == s).sum()} {s}" for s in ("diverged", "failed", "missing")]
    parts = [p for p in parts if not p.startswith("0 ")]
    return ("\n" + ", ".join(parts) + " (failed and missing left out)") if parts else ""


def _new_axes(ax: Axes | None) -> Axes:
    if ax is not None:
        return ax
    _, ax = plt.subplots(figsize=(5.6, 4.4), constrained_layout=True)
    return ax


def _groups(ds: xr.Dataset, hue: str | None) -> list[tuple[str | None, xr.Dataset]]:
    if hue is None:
        return [(None, ds)]
    return [(f"{hue}={v}", ds.sel({hue: v})) for v in ds[hue].values]


def _x_values(da: xr.DataArray | xr.Dataset, dim: str) -> tuple[np.ndarray, list[str] | None]:
    values = da[dim].values
    if np.issubdtype(values.dtype, np.number):
        return values.astype(float), None
    return np.arange(len(values), dtype=float), [str(v) for v in values]


def _errorbars(ax: Axes, xs, center, low, high, label, logy: bool, **style) -> Any:
    """Center with asymmetric bars from ``low`` to ``high`` (no bar where NaN: no interval);
    on a log axis a bound at or below zero is cut at half the smallest positive value."""
    center, low, high = (np.asarray(a, dtype=float) for a in (center, low, high))
    if logy:
        positive = np.concatenate([center[center > 0], low[low > 0]])
        floor = positive.min() / 2 if positive.size else np.nan
        low = np.where(low > 0, low, np.where(np.isnan(low), np.nan, floor))
    yerr = np.nan_to_num([center - low, high - center], nan=0.0).clip(0)
    style = {"marker": "o", "ms": 4, "capsize": 3, **style}
    return ax.errorbar(xs, center, yerr=yerr, label=label, **style)


def _scales(ax: Axes, xs: np.ndarray, labels: list[str] | None, logx: bool, logy: bool) -> None:
    if labels is not None:
        ax.set_xticks(np.arange(len(labels)), labels, rotation=45, ha="right")
    elif logx:
        ax.set_xscale("log")
        positive = xs[xs > 0]
        if positive.size and positive.max() / positive.min() < SHORT_RANGE:
            ax.xaxis.set_major_locator(FixedLocator(positive))
            ax.xaxis.set_major_formatter(PLAIN)
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
    if logy:
        _log_y(ax)


def _log_y(ax: Axes) -> None:
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    if high / low < SHORT_RANGE:  # matplotlib would label every minor tick, overlapping
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(PLAIN)
        ax.yaxis.set_minor_formatter(NullFormatter())


def learning_curve(
    data: Data,
    x: str = "N_SAMPLES",
    y: str = "test_loss",
    *,
    hue: str | None = None,
    stat: analysis.summary.Stat = "median",
    ci: float = 0.95,
    ax: Axes | None = None,
    logx: bool = True,
    logy: bool = True,
) -> Axes:
    """``y`` (a loss or a scalar grab; a curve's final value) against the axis ``x``: the
    ``stat`` over trials with its interval (``analysis.summarize``)."""
    ds = as_dataset(data)
    var = resolve_variable(ds, y)
    xdim, hdim = _plotted_dims(ds, x, hue)
    ds = _only(ds, [xdim, hdim], f"learning_curve(x={x!r})")
    if "step" in ds[var].dims:
        ds = ds.isel(step=-1)  # whole curves were recorded: the final value
    s = analysis.summarize(ds, var, stat=stat, ci=ci)
    ax = _new_axes(ax)
    xs = labels = None
    for label, g in _groups(s, hdim):
        xs, labels = _x_values(g, xdim)
        _errorbars(ax, xs, g["center"], g["low"], g["high"], label or var, logy)
    _scales(ax, xs, labels, logx, logy)
    ax.set_xlabel(xdim)
    ax.set_ylabel(f"{var} ({s.attrs['statistic']} over {TRIAL_AXIS})")
    ax.legend(fontsize="small", title=s.attrs["label"] + _status_note(ds), title_fontsize="small")
    return ax


def time_to_threshold(
    data: Data,
    x: str,
    *,
    threshold: float | None = None,
    hue: str | None = None,
    ci: float = 0.95,
    ax: Axes | None = None,
    logx: bool = True,
    logy: bool = True,
    xlabel: str | None = None,
) -> Axes:
    """Steps until the EMA train loss first fell below ``threshold`` (default: the largest)
    against the axis ``x``: the Kaplan-Meier median over trials, which counts the jobs that
    stopped before reaching it as censored (``analysis.time_to_threshold``), with its bootstrap
    interval. A grid point where fewer than half reached it is drawn as a triangle at the step
    its jobs stopped ("at least this"); the fraction that reached it is drawn in a strip below
    ``ax`` (``ax.child_axes[0]``), which carries the x label (``xlabel``, default: the axis).
    """
    ds = as_dataset(data)
    if "timekeys" not in ds:
        raise KeyError("the result has no timekeys (no LOSS_CHECKPOINTS were recorded).")
    if threshold is None and "threshold" in ds.coords:
        threshold = float(max(ds["threshold"].values))
    xdim, hdim = _plotted_dims(ds, x, hue)
    ds = _only(ds, [xdim, hdim], f"time_to_threshold(x={x!r})")
    if "threshold" in ds.coords:
        tt = analysis.time_to_threshold(ds, threshold, ci=ci)
    else:  # a result without its LOSS_CHECKPOINTS: its one threshold
        tt = analysis.time_to_threshold(ds.isel(threshold=0), None, ci=ci)
    what = f"threshold {threshold:g}" if threshold is not None else "the threshold"
    if not (tt["reached"] > 0).any():  # else matplotlib fails on an empty log scale
        raise ValueError(
            f"no job reached {what}: there are no times to plot; choose a larger threshold."
        )
    if np.issubdtype(tt[xdim].dtype, np.number):
        tt = tt.sortby(xdim)  # lines join the points in the order of x
    # a job already below the threshold at step 0 has time 0, which a log axis cannot show
    zero = logy and bool((tt["low"] == 0).any() | (tt["median"] == 0).any())
    ax = _new_axes(ax)
    frac = ax.inset_axes((0, -0.34, 1, 0.22), sharex=ax)
    xs = labels = None
    any_censored = False
    for label, g in _groups(tt, hdim):
        xs, labels = _x_values(g, xdim)
        # a bound that is not identified (fewer than 3 trials, or an unbounded upper quantile)
        # is not drawn: the bar would be invented; censored medians get their own marker
        high = g["high"].where(g["median"].notnull())
        label = label or "median"
        bars = _errorbars(ax, xs, g["median"], g["low"], high, label, logy and not zero)
        color = bars.lines[0].get_color()
        censored = g["median_censored"].values
        if censored.any():
            any_censored = True
            ax.scatter(
                xs[censored],
                g["censored_at"].values[censored],
                marker="^",
                s=50,
                facecolors="none",
                edgecolors=color,
                zorder=3,
            )
        frac.plot(xs, g["reached"].values, ":", marker="o", ms=3, color=color)
    _scales(ax, xs, labels, logx, logy and not zero)
    if zero:
        ax.set_yscale("symlog", linthresh=1)  # linear below 1 step, so 0 is drawn
    if any_censored:
        ax.scatter(
            [],
            [],
            marker="^",
            facecolors="none",
            edgecolors="gray",
            label="median ≥ last step (fewer than half reached)",
        )
    frac.set_ylim(-0.05, 1.05)
    frac.set_yticks([0, 0.5, 1], ["0", "½", "1"])
    frac.set_ylabel("reached", fontsize="small")
    frac.set_xlabel(xlabel or xdim)
    ax.tick_params(labelbottom=False)
    ax.set_ylabel(f"steps to EMA loss < {threshold:g}" if threshold is not None else "steps")
    title = f"Kaplan-Meier median over {TRIAL_AXIS}, bars: {ci:.0%} bootstrap CI"
    ax.legend(fontsize="small", title=title + _status_note(ds), title_fontsize="small")
    return ax


def power_law_fit(
    data: Data,
    x: str = "N_SAMPLES",
    y: str = "test_loss",
    *,
    hue: str | None = None,
    ci: float = 0.95,
    ax: Axes | None = None,
) -> tuple[Axes, xr.Dataset]:
    """The geometric mean of ``y`` over trials against ``x`` (with its bootstrap interval), the
    power law fitted to it (``analysis.fit_power_law``) and the fit's ``ci`` band; returns the
    axes and the fit."""
    ds = as_dataset(data)
    var = resolve_variable(ds, y)
    xdim, hdim = _plotted_dims(ds, x, hue)
    ds = _only(ds, [xdim, hdim], f"power_law_fit(x={x!r})")
    fit = analysis.fit_power_law(ds, xdim, var, hue=hdim, ci=ci)
    if "step" in ds[var].dims:
        ds = ds.isel(step=-1)
    s = analysis.summarize(ds, var, stat="gmean", ci=ci)
    ax = _new_axes(ax)
    xs = None
    for (label, g), (_, f) in zip(_groups(s, hdim), _groups(fit, hdim)):
        xs, _ = _x_values(g, xdim)
        name = f"{label}: " if label else ""
        bars = _errorbars(ax, xs, g["center"], g["low"], g["high"], None, True, ls="none")
        color = bars.lines[0].get_color()
        draw_fit(ax, f, ci, color=color, label=name)
    _scales(ax, xs, None, True, True)
    ax.set_xlabel(xdim)
    ax.set_ylabel(f"{var} (geometric mean over {TRIAL_AXIS})")
    title = f"points: {ci:.0%} bootstrap CI; fit: y = a x^b, {ci:.0%} bootstrap band"
    ax.legend(fontsize="small", title=title + _status_note(ds), title_fontsize="small")
    return ax, fit


def draw_fit(ax: Axes, fit: xr.Dataset, ci: float = 0.95, *, color=None, label: str = "") -> None:
    """The line of one fit of ``analysis.fit_power_law`` over its fitted range, labelled with
    its exponent and interval, and the ``ci`` band of the refitted lines (none where the fit
    has no interval)."""
    grid = np.geomspace(float(fit["x_min"]), float(fit["x_max"]), 60)
    low, high = float(fit["exponent_low"]), float(fit["exponent_high"])
    line = float(fit["prefactor"]) * grid ** float(fit["exponent"])
    text = f"exponent {float(fit['exponent']):.2f} [{low:.2f}, {high:.2f}]"
    (drawn,) = ax.plot(grid, line, "--", color=color, label=label + text)
    if np.isfinite(low):
        boot = fit["prefactor_boot"].values[:, None] * grid ** fit["exponent_boot"].values[:, None]
        band = np.nanquantile(boot, [(1 - ci) / 2, (1 + ci) / 2], axis=0)
        ax.fill_between(grid, *band, color=drawn.get_color(), alpha=0.2, lw=0)


def loss_vs_step(
    data: Data,
    y: str = "train_loss",
    *,
    hue: str | None = None,
    ax: Axes | None = None,
    logy: bool = True,
) -> Axes:
    """A curve recorded with ``ONLYTHRESHOLDS=False`` against the step: one thin line per job
    that ends at the job's exit step (never the padding after it); the test loss and grabs as
    points at the steps they were evaluated; an ``x`` where a job diverged; a thick line for
    the median over trials while every trial was still training."""
    ds = as_dataset(data)
    var = resolve_variable(ds, y)
    if "step" not in ds[var].dims:
        raise ValueError(
            f"{var} has no step axis: run the sweep with ONLYTHRESHOLDS=False to record curves."
        )
    (hdim,) = _plotted_dims(ds, hue)
    ds = _only(ds, [hdim], "loss_vs_step")
    curve = taken(ds, var)
    points = var != "train_loss"
    ax = _new_axes(ax)
    steps = np.arange(ds.sizes["step"])
    for label, g in _groups(ds.assign(_curve=curve), hdim):
        c = g["_curve"].transpose(..., "step")
        jobs = c.values.reshape(-1, c.sizes["step"])
        status = np.asarray(g["status"].values).reshape(-1)
        last = exit_step(g).values.reshape(-1)
        ran = last[status != "missing"]
        running = steps <= (ran.min() if ran.size else -1)
        with warnings.catch_warnings():  # steps where no job was measured stay NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nanmedian(np.where(running, jobs, np.nan), axis=0)
        style = {"marker": ".", "ms": 6} if points else {}
        (line,) = ax.plot(
            steps[np.isfinite(median)],
            np.asarray(median)[np.isfinite(median)],
            lw=2,
            label=f"{label or var}: median over {len(jobs)} {TRIAL_AXIS}s",
            **style,
        )
        for job, st in zip(jobs, status):
            ok = np.isfinite(job)
            ax.plot(
                steps[ok],
                job[ok],
                lw=0.7,
                alpha=0.5,
                color=line.get_color(),
                **({"marker": ".", "ms": 3} if points else {}),
            )
            if st == "diverged" and ok.any():
                ax.plot(steps[ok][-1], job[ok][-1], "x", color="red", ms=8)
    ax.plot([], [], lw=0.7, color="gray", label="one line per job, to its exit step")
    ax.plot([], [], "x", color="red", label="diverged")
    if logy:
        _log_y(ax)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{var} (at evaluations)" if points else f"{var} (EMA)")
    ax.legend(fontsize="small", title=_status_note(ds).lstrip("\n") or None)
    return ax


def loglog_fit(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    *,
    labels: Sequence[Any] | None = None,
    ax: Axes | None = None,
) -> tuple[Axes, float]:
    """Scatter ``y`` against ``x`` on log-log axes with the least-squares line of ``log y`` on
    ``log x``; returns the axes and the slope. The slope has no interval: for a sweep, use
    ``analysis.fit_power_law`` and ``power_law_fit``, which resample trials. Non-finite or
    non-positive points are left out of both."""
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
    fig.savefig(path, dpi=100, bbox_inches="tight")  # a strip below the axes stays in view
    plt.close(fig)
    return path
