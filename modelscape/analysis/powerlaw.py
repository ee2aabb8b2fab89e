"""Power-law fits with bootstrap intervals: ``fit_power_law``.

The fit is least squares of log y against log x, where each x value contributes the mean of
log y over its trials (the log of the geometric mean; with the same trials at every x this is
the least-squares line through all the points). ``y = prefactor * x**exponent``, so a loss
falling like N^-a has exponent -a.

The interval resamples trials within each x value (a job's seed depends on all its values, so
trials at different x are independent), refits, and takes the percentile interval of the
refitted exponents and prefactors, seeded. Coverage is close to nominal with 16 trials; with 4,
a bootstrap of so few trials under-states the spread (tests/test_analysis.py measures both).
With fewer than 3 trials at some x there is no interval (NaN). Non-finite or non-positive values
(diverged, failed and missing jobs) are left out of the fit.
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
    interval_label,
    last_dim,
    resolve_dim,
    resolve_variable,
)


def fit_power_law(
    data: Data,
    x: str,
    y: str,
    over: str = "trial",
    hue: str | None = None,
    ci: float = 0.95,
    *,
    n_boot: int = N_BOOT,
    seed: int = SEED,
) -> xr.Dataset:
    """Fit ``y = prefactor * x**exponent`` over the axis ``x``, with ``over`` the trials (see
    the module docstring); one fit per value of ``hue`` when given. Any other axis must have
    one value (select with ``ds.sel(...)`` first). A curve's final value is fitted.

    Returns a Dataset (over ``hue`` when given) with ``exponent``, ``exponent_low``,
    ``exponent_high``, ``prefactor``, ``prefactor_low``, ``prefactor_high``, ``x_min`` and
    ``x_max`` (the fitted range: x values with at least one finite positive y), ``n_points``
    and ``min_trials`` (the fewest trials used at one x); and the refits themselves,
    ``exponent_boot`` and ``prefactor_boot`` (a ``resample`` axis), from which a plot draws the
    band of the fitted line.
    """
    ds = as_dataset(data)
    var = resolve_variable(ds, y)
    xdim, over = resolve_dim(ds, x), resolve_dim(ds, over)
    hdim = resolve_dim(ds, hue) if hue is not None else None
    if over in (xdim, hdim):
        raise ValueError(f"the {over} axis is resampled; it cannot be the x axis or the hue.")
    da = ds[var].astype(float)
    if "step" in da.dims:
        da = da.isel(step=-1)  # whole curves were recorded: the final value
    keep = {xdim, over} | ({hdim} if hdim else set())
    stray = [d for d in da.dims if d not in keep and da.sizes[d] > 1]
    if stray:
        raise ValueError(
            f"fit_power_law: axes {stray} have several values; pass one as hue= or select a "
            f"value first (ds.sel({stray[0]}=...))."
        )
    da = da.squeeze([d for d in da.dims if d not in keep], drop=True)
    if not np.issubdtype(da[xdim].dtype, np.number):
        raise ValueError(f"the x axis {xdim!r} must be numeric to fit a power law.")
    groups = [None] if hdim is None else list(da[hdim].values)
    fits = [
        _fit(da if h is None else da.sel({hdim: h}), xdim, over, ci, n_boot, seed) for h in groups
    ]
    hdims = [hdim] if hdim else []
    out = {
        name: (hdims, np.reshape([f[name] for f in fits], -1 if hdim else ()))
        for name in fits[0]
        if not name.endswith("_boot")
    }
    for name in ("exponent_boot", "prefactor_boot"):
        shape = (-1, n_boot) if hdim else (n_boot,)
        out[name] = (hdims + ["resample"], np.reshape([f[name] for f in fits], shape))
    result = xr.Dataset(out, coords={hdim: da[hdim].values} if hdim else {})
    result.attrs = {
        "x": xdim,
        "y": var,
        "fit": "least squares of the mean over trials of log y against log x",
        "interval": interval_label(ci, "exponent and prefactor", over, n_boot, seed),
        "note": NO_INTERVAL,
    }
    return result


def _fit(
    da: xr.DataArray, xdim: str, over: str, ci: float, n_boot: int, seed: int
) -> dict[str, Any]:
    values = last_dim(da.transpose(xdim, ...), over).values  # [x, trials]
    xs = da[xdim].values.astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        logy = np.log(values)
    k, packed = compact(np.isfinite(logy), logy)
    used = (k > 0) & (xs > 0)
    if used.sum() < 2:
        raise ValueError(
            f"fit_power_law needs finite positive values at two x values or more; "
            f"{int(used.sum())} of {len(xs)} have them."
        )
    k, packed, logx = k[used], packed[used], np.log(xs[used])
    slope, intercept = _line(logx, np.nansum(packed, -1) / k)
    index, mask = draws(k, packed.shape[-1], n_boot, seed)
    boot = take(packed, index, mask)
    b_slope, b_intercept = _line(logx, np.nansum(boot, -1) / k)
    fewest = k.min()
    slope_low, slope_high = percentile_interval(b_slope, fewest, ci)
    int_low, int_high = percentile_interval(b_intercept, fewest, ci)
    return {
        "exponent": slope,
        "exponent_low": float(slope_low),
        "exponent_high": float(slope_high),
        "prefactor": float(np.exp(intercept)),
        "prefactor_low": float(np.exp(int_low)),
        "prefactor_high": float(np.exp(int_high)),
        "x_min": float(xs[used].min()),
        "x_max": float(xs[used].max()),
        "n_points": int(used.sum()),
        "min_trials": int(fewest),
        "exponent_boot": b_slope,
        "prefactor_boot": np.exp(b_intercept),
    }


def _line(logx: np.ndarray, logy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope and intercept of ``logy`` [..., x] against ``logx`` [x]."""
    dx = logx - logx.mean()
    mean_y = logy.mean(-1)
    slope = ((logy - mean_y[..., None]) * dx).sum(-1) / (dx**2).sum()
    return slope, mean_y - slope * logx.mean()
