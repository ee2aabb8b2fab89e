"""What a recorded curve really holds: the steps a job took and the steps it was evaluated at.

With ONLYTHRESHOLDS=False every curve has MAX_ITER entries. After a job exits, its curve is
padded with its last value, and its test loss (and each grab) is held between evaluations,
which happen every EVAL_EVERY steps and at the exit step. The stored arrays keep that padding
(a table of final values needs it); a plot or an export takes only the steps below.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

TRAIN_CURVES = ("train_loss",)  # recorded at every step; the others at evaluations


def exit_step(ds: xr.Dataset) -> xr.DataArray:
    """Each job's last step (``steps - 1``); -1 for a job with no record."""
    return (ds["steps"].astype(float).fillna(0) - 1).astype(int)


def eval_every(ds: xr.Dataset) -> xr.DataArray | int:
    """EVAL_EVERY: an axis of the sweep, or the value the result carries."""
    if "EVAL_EVERY" in ds.coords:
        return ds["EVAL_EVERY"]
    if "EVAL_EVERY" in ds.attrs:
        return int(ds.attrs["EVAL_EVERY"])
    raise KeyError(
        "the evaluation steps are not known: this result does not carry EVAL_EVERY. Set it "
        "with ds.attrs['EVAL_EVERY'] = <the sweep's EVAL_EVERY>."
    )


def taken(ds: xr.Dataset, name: str) -> xr.DataArray:
    """The curve ``name`` where it was measured: up to each job's exit step for the train loss,
    at the evaluation steps for the others; NaN elsewhere (padding, held values). A diverged
    job's last evaluation is the one before it diverged."""
    da = ds[name]
    step = xr.DataArray(np.arange(da.sizes["step"]), dims="step")
    last = exit_step(ds)
    if name in TRAIN_CURVES:
        return da.where(step <= last)
    every = eval_every(ds)
    evaluated = (step % every == 0) & (step <= last)
    if "status" in ds:
        evaluated = evaluated | ((step == last) & (ds["status"] == "ok"))
    return da.where(evaluated)
