"""Times to threshold as censored measurements: the Kaplan-Meier median over trials.

A job records the first step at which its EMA train loss fell below each threshold
(``timekeys``). A job that stopped without reaching a threshold did not take "no time": its time
is *at least* its last step, a right-censored measurement. Averaging only the jobs that reached
the threshold leaves out the slowest ones, so it is biased low, and more so where fewer jobs
reached it. Here, per grid point over the trials:

- an ``ok`` job that reached the threshold is an event at its timekey;
- an ``ok`` job that did not is censored at its own last step (``steps - 1``; ``MAX_ITER`` can be
  an axis, so each job has its own);
- a ``diverged`` job that did not reach the threshold before it diverged never will: its time is
  infinite (it stays at risk), not censored at its stop; one that reached it first is an event;
- ``failed`` and ``missing`` jobs are left out, and counted (``n_failed``, ``n_missing``).

The survival curve is the Kaplan-Meier product-limit estimate (at a tie, events come before
censorings), and the median is the first step at which it falls to 1/2 or below. Where it never
does (fewer than half of the jobs reached the threshold before the censoring), the median is
not identified: NaN, with ``median_censored`` set, meaning "at least ``censored_at``", and never
a number computed from the jobs that reached it. The interval is the bootstrap percentile
interval of that median (``_bootstrap``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from modelscape.analysis._bootstrap import (
    N_BOOT,
    NO_INTERVAL,
    SEED,
    draws,
    percentile_interval,
    take,
)
from modelscape.analysis._data import (
    Data,
    as_dataset,
    compact,
    counts,
    interval_label,
    job_status,
    last_dim,
    resolve_dim,
)

# what a job says about its time, in the order of a tie: events first
EVENT, CENSORED, NEVER, LEFT_OUT = 0, 1, 2, 3


def km_median(time: np.ndarray, kind: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The Kaplan-Meier median along the last axis of ``time`` and ``kind`` (``EVENT``,
    ``CENSORED``, ``NEVER``: at +inf, or ``LEFT_OUT``), where ``k`` jobs are not left out; NaN
    where the survival never falls to 1/2."""
    time = np.where(kind == LEFT_OUT, np.inf, time)
    order = np.lexsort((kind, time), axis=-1)
    time = np.take_along_axis(time, order, -1)
    event = np.take_along_axis(kind, order, -1) == EVENT
    at_risk = k[..., None] - np.arange(time.shape[-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        survival = np.cumprod(np.where(event, 1 - 1 / at_risk, 1.0), axis=-1)
    below = survival <= 0.5 + 1e-9  # a product of exact halves may round just above 1/2
    first = below.argmax(-1)
    median = np.take_along_axis(time, first[..., None], -1)[..., 0]
    return np.where(below.any(-1) & (k > 0), median, np.nan)


def time_to_threshold(
    data: Data,
    threshold: float | None = None,
    over: str = "trial",
    ci: float = 0.95,
    *,
    n_boot: int = N_BOOT,
    seed: int = SEED,
) -> xr.Dataset:
    """Steps until the EMA train loss first fell below ``threshold``, over the axis ``over``,
    with censoring (Kaplan-Meier; see the module docstring).

    ``data``: a ``Result``, a run folder or ``Result.to_xarray()``. ``threshold``: one of the
    sweep's LOSS_CHECKPOINTS, or None for all of them (a ``threshold`` dimension).

    Returns a Dataset over the remaining axes with ``median``, ``low``, ``high`` (the KM median
    and its ``ci`` bootstrap percentile interval; NaN where not identified), ``median_censored``
    (True where the median is at least ``censored_at``), ``reached`` (the fraction of the
    counted jobs that reached the threshold), ``censored_at`` (the last step of the jobs that
    stopped without reaching it, the largest one if they differ; NaN when none did),
    ``mean_reached`` (the survivors-only mean, biased low: for comparison only) and the job
    counts ``n_ok``, ``n_diverged``, ``n_failed``, ``n_missing``.
    """
    ds = as_dataset(data)
    if "timekeys" not in ds:
        raise KeyError("the result has no timekeys (no LOSS_CHECKPOINTS were recorded).")
    over = resolve_dim(ds, over)
    tk = _at_threshold(ds["timekeys"], threshold)
    status = job_status(ds)
    if "steps" not in ds:
        raise KeyError("the result has no steps per job: load it with modelscape.load.")
    kind, time, reached = _measurements(tk, status, ds["steps"])
    dims = [d for d in kind.dims if d != over]
    kind_a, time_a = last_dim(kind, over).values, last_dim(time, over).values
    valid = kind_a != LEFT_OUT
    k, time_p, kind_p = compact(valid, time_a, kind_a)
    kind_p = np.where(np.isnan(kind_p), LEFT_OUT, kind_p).astype(int)
    median = km_median(time_p, kind_p, k)
    index, mask = draws(k, time_p.shape[-1], n_boot, seed)
    boot_kind = np.where(
        mask, np.take_along_axis(np.broadcast_to(kind_p, index.shape), index, -1), LEFT_OUT
    )
    boot = km_median(take(time_p, index, mask), boot_kind, np.broadcast_to(k, index.shape[:-1]))
    low, high = percentile_interval(np.where(np.isnan(boot), np.inf, boot), k, ci)

    coords = {d: kind[d] for d in dims if d in kind.coords}
    out: dict[str, Any] = {
        "median": (dims, median),
        "low": (dims, low),
        "high": (dims, high),
        "median_censored": (dims, np.isnan(median) & (k > 0)),
        "reached": (dims, reached.sum(over).transpose(*dims).values / np.where(k > 0, k, np.nan)),
        "censored_at": time.where(kind == CENSORED).max(over),
        "mean_reached": time.where(kind == EVENT).mean(over),
        **counts(status, over),
    }
    result = xr.Dataset(out, coords=coords)
    if "threshold" in tk.coords:
        result = result.assign_coords(threshold=tk["threshold"])
    result.attrs = {
        "statistic": "Kaplan-Meier median of the steps to threshold",
        "interval": interval_label(ci, "Kaplan-Meier median", over, n_boot, seed),
        "note": f"{NO_INTERVAL}; median NaN where fewer than half reached it (median_censored)",
    }
    return result


def _at_threshold(tk: xr.DataArray, threshold: float | None) -> xr.DataArray:
    """The timekeys at ``threshold`` (all of them when None)."""
    if threshold is None:
        return tk
    if "threshold" not in tk.coords:
        raise KeyError("the thresholds of these timekeys are not known; pass threshold=None.")
    thresholds = [float(t) for t in tk["threshold"].values]
    matches = [i for i, t in enumerate(thresholds) if np.isclose(threshold, t)]
    if not matches:
        raise KeyError(f"threshold {threshold:g} was not recorded; thresholds: {thresholds}.")
    return tk.isel(threshold=matches[0])


def _measurements(
    tk: xr.DataArray, status: xr.DataArray, steps: xr.DataArray
) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    """Per job: its kind (event, censored, left out), its time (+inf for a diverged job that
    never reached the threshold) and whether it reached the threshold."""
    counted = (status == "ok") | (status == "diverged")
    reached = counted & np.isfinite(tk)
    censored = counted & ~reached & (status == "ok")
    kind = xr.where(reached, EVENT, xr.where(censored, CENSORED, NEVER))
    kind = xr.where(counted, kind, LEFT_OUT)
    last_step = (steps.astype(float) - 1).broadcast_like(tk)
    time = xr.where(reached, tk, xr.where(censored, last_step, np.inf))
    time = time.where(counted)
    return kind, time, reached
