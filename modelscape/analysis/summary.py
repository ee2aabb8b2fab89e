"""Summaries over trials that mean something on log axes: ``summarize``.

Losses spread over orders of magnitude across trials, so the mean is not the typical value and
mean +- std dips below zero on a log axis. The statistics:

- ``"median"`` (the default): the median over trials, with the bootstrap percentile interval of
  the median. A diverged job counts as +inf (its loss blew up): the median stays honest while
  fewer than half diverged, and is NaN (not identified) otherwise.
- ``"gmean"``: the geometric mean, exp(mean log y), with the bootstrap percentile interval of
  the mean of log y, mapped back: an interval in log space, always positive.
- ``"mean"``: the mean, with mean +- one standard error (``ci`` does not apply).

Non-finite values (diverged jobs for ``gmean`` and ``mean``), failed and missing jobs are left
out and counted (``n``: the trials used). The bootstrap resamples trials within each grid point
and is seeded (``_bootstrap``); with fewer than 3 trials there is no interval (NaN).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import xarray as xr

from modelscape.analysis._bootstrap import (
    MIN_TRIALS,
    N_BOOT,
    NO_INTERVAL,
    SEED,
    draws,
    percentile_interval,
    sorted_median,
    take,
)
from modelscape.analysis._data import (
    Data,
    as_dataset,
    compact,
    interval_label,
    job_status,
    last_dim,
    resolve_dim,
    resolve_variable,
)
from modelscape.analysis.curves import exit_step

Stat = Literal["median", "gmean", "mean"]
STATS = ("median", "gmean", "mean")
LABELS = {
    "median": "median",
    "gmean": "geometric mean",
    "mean": "mean",
}


def summarize(
    data: Data,
    y: str,
    over: str = "trial",
    stat: Stat = "median",
    ci: float = 0.95,
    *,
    n_boot: int = N_BOOT,
    seed: int = SEED,
) -> xr.Dataset:
    """The ``stat`` of the variable ``y`` over the axis ``over`` (see the module docstring).

    Returns a Dataset over the remaining axes (a curve keeps its ``step`` axis) with ``center``,
    ``low``, ``high`` and ``n`` (the trials used); its ``attrs`` say which statistic and
    interval (``label``, ``interval``) for a legend.
    """
    if stat not in STATS:
        raise ValueError(f"stat must be one of {', '.join(STATS)}; got {stat!r}.")
    ds = as_dataset(data)
    var = resolve_variable(ds, y)
    over = resolve_dim(ds, over)
    da = ds[var].astype(float)
    status = job_status(ds).broadcast_like(da)
    if stat == "median":  # a diverged job is worse than any finite value, from its divergence on
        diverged = status == "diverged"
        if "step" in da.dims:
            diverged = diverged & (da["step"] >= exit_step(ds).broadcast_like(da))
        da = xr.where(diverged, np.inf, da)
    values = last_dim(da, over)
    dims = list(values.dims[:-1])
    arr = values.values
    if stat == "gmean":
        with np.errstate(divide="ignore", invalid="ignore"):
            arr = np.log(arr)
    valid = ~np.isnan(arr) if stat == "median" else np.isfinite(arr)
    k, packed = compact(valid, arr)
    if stat == "mean":
        center, low, high = _mean_se(packed, k)
        interval = "mean +- 1 standard error"
    else:
        index, mask = draws(k, packed.shape[-1], n_boot, seed)
        boot = take(packed, index, mask)
        kb = np.broadcast_to(k, boot.shape[:-1])
        if stat == "median":
            center = sorted_median(packed, k)
            low, high = percentile_interval(sorted_median(boot, kb), k, ci)
        else:
            with np.errstate(invalid="ignore"):
                center = np.nansum(packed, -1) / np.where(k > 0, k, np.nan)
                low, high = percentile_interval(np.nansum(boot, -1) / kb, k, ci)
            center, low, high = np.exp(center), np.exp(low), np.exp(high)
        interval = interval_label(ci, LABELS[stat], over, n_boot, seed)
        center = np.where(np.isfinite(center), center, np.nan)
    coords = {d: values[d] for d in dims if d in values.coords}
    out = xr.Dataset(
        {
            "center": (dims, center),
            "low": (dims, low),
            "high": (dims, high),
            "n": (dims, k),
        },
        coords=coords,
    )
    out.attrs = {
        "variable": var,
        "statistic": LABELS[stat],
        "interval": interval,
        "label": f"{LABELS[stat]} over {over}, " + _short(ci, stat),
        "note": NO_INTERVAL,
    }
    return out


def _mean_se(packed: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, ...]:
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(packed, -1) / np.where(k > 0, k, np.nan)
        var = np.nansum((packed - mean[..., None]) ** 2, -1) / (k - 1)
        se = np.sqrt(var / k)
    se = np.where(k >= MIN_TRIALS, se, np.nan)
    return mean, mean - se, mean + se


def _short(ci: float, stat: str) -> str:
    """The interval in a few words, for a legend."""
    return "bars: ±1 s.e." if stat == "mean" else f"bars: {ci:.0%} bootstrap CI"
