"""The inputs every analysis takes: a ``Result``, a run folder or a ``Result.to_xarray()``
Dataset, and the names of its axes and variables."""

from __future__ import annotations

import os

import numpy as np
import xarray as xr

from modelscape.results.result import Result
from modelscape.sweep.jobs import AXIS_ALIASES

Data = Result | xr.Dataset | str | os.PathLike


def as_dataset(data: Data) -> xr.Dataset:
    """The ``xarray.Dataset`` of a result, of a run folder (``SAVE_DIR``), or the Dataset itself."""
    if isinstance(data, xr.Dataset):
        return data
    if isinstance(data, Result):
        return data.to_xarray()
    if isinstance(data, (str, os.PathLike)):
        from modelscape.store import load

        return load(data).to_xarray()
    raise TypeError(
        f"expected a Result, a run folder or an xarray.Dataset, got {type(data).__name__}."
    )


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


def job_status(ds: xr.Dataset) -> xr.DataArray:
    """Each job's status ("ok", "diverged", "failed", "missing"); all "ok" when not stored."""
    if "status" in ds:
        return ds["status"]
    axes = [d for d in ds.dims if d not in ("step", "threshold")]
    return xr.DataArray(np.full([ds.sizes[d] for d in axes], "ok", dtype=object), dims=axes)


def counts(status: xr.DataArray, over: str) -> dict[str, xr.DataArray]:
    """How many jobs of each status, over the axis ``over``, as ``n_<status>`` variables."""
    return {
        f"n_{s}": (status == s).sum(over).astype(int)
        for s in ("ok", "diverged", "failed", "missing")
    }


def last_dim(da: xr.DataArray, over: str) -> xr.DataArray:
    """``da`` with ``over`` as its last dimension (a length-1 one added when absent)."""
    if over not in da.dims:
        da = da.expand_dims({over: 1})
    return da.transpose(..., over)


def compact(valid: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Along the last axis, the entries where ``valid`` first (in order), with how many there
    are: ``(k, *packed)``. Entries beyond ``k`` are NaN."""
    order = np.argsort(~valid, axis=-1, kind="stable")
    k = valid.sum(-1)
    keep = np.arange(valid.shape[-1]) < k[..., None]
    packed = [
        np.where(keep, np.take_along_axis(np.asarray(a, dtype=float), order, axis=-1), np.nan)
        for a in arrays
    ]
    return (k, *packed)


def interval_label(ci: float, what: str, over: str, n_boot: int, seed: int) -> str:
    return (
        f"{ci:.0%} bootstrap percentile interval of the {what} (trials resampled along "
        f"{over!r}, {n_boot} resamples, seed {seed})"
    )
