"""The bootstrap shared by every analysis: trials resampled within each grid point, seeded.

A job's seed depends on all of its values, so the trials at different grid points are
independent draws: each grid point resamples its own trials, with replacement, as many as it
has. The interval is the percentile interval of the statistic over the resamples. With fewer
than ``MIN_TRIALS`` trials a resample says too little about the spread, and there is no
interval (NaN), never an invented one.
"""

from __future__ import annotations

import numpy as np

MIN_TRIALS = 3
N_BOOT = 1000
SEED = 0
NO_INTERVAL = f"no interval where fewer than {MIN_TRIALS} trials are valid (NaN)"


def draws(k: np.ndarray, n: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Which trial each resample takes: an index [n_boot, *k.shape, n] into the last axis of
    arrays whose valid values come first (``compact``), each grid point drawing ``k`` of its
    first ``k``; and the mask of the drawn columns (the first ``k``)."""
    rng = np.random.default_rng(seed)
    shape = (n_boot, *k.shape, n)
    index = (rng.random(shape) * k[..., None]).astype(np.int64)
    return index, np.arange(n) < k[..., None]


def take(packed: np.ndarray, index: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The resampled values of ``packed`` (NaN outside the drawn columns)."""
    drawn = np.take_along_axis(np.broadcast_to(packed, index.shape), index, axis=-1)
    return np.where(mask, drawn, np.nan)


def percentile_interval(
    stats: np.ndarray, k: np.ndarray, ci: float
) -> tuple[np.ndarray, np.ndarray]:
    """The ``ci`` percentile interval of ``stats`` [n_boot, ...] over the resamples; NaN where
    fewer than ``MIN_TRIALS`` trials were valid or a bound is not finite (not identified)."""
    if not 0 < ci < 1:
        raise ValueError(f"ci is a coverage between 0 and 1, such as 0.95; got {ci}.")
    with np.errstate(invalid="ignore"):
        low, high = np.quantile(stats, [(1 - ci) / 2, (1 + ci) / 2], axis=0)
    enough = k >= MIN_TRIALS
    low = np.where(enough & np.isfinite(low), low, np.nan)
    high = np.where(enough & np.isfinite(high), high, np.nan)
    return low, high


def sorted_median(values: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The median of the first ``k`` values along the last axis (NaN beyond them, and where
    ``k`` is 0); +inf values count as the largest."""
    s = np.sort(np.where(np.isnan(values), np.inf, values), axis=-1)
    s = np.where(np.arange(values.shape[-1]) < k[..., None], s, np.nan)
    kk = np.broadcast_to(k, s.shape[:-1])
    lo = np.take_along_axis(s, np.maximum((kk - 1) // 2, 0)[..., None], -1)[..., 0]
    hi = np.take_along_axis(s, np.maximum(kk // 2, 0)[..., None], -1)[..., 0]
    with np.errstate(invalid="ignore"):
        mid = np.where(lo == hi, lo, (lo + hi) / 2)
    return np.where(kk > 0, mid, np.nan)
