"""PROTOTYPE: the loop rules for a window of steps, vectorized over jobs (and over steps where
the rules allow), written once for numpy arrays (host) and torch tensors (on the device).

Exact: the EMA recursion runs step by step in float64 with the reference's operation order
(``s*ema + (1-s)*loss``), so every EMA and timekey equals the scalar loop's bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

INF = float("inf")


def _f64(xp: Any, a: Any) -> Any:
    return a.to(torch.float64) if xp is torch else np.asarray(a, dtype=np.float64)


def scan(
    xp: Any,
    t0: int,
    losses: Any,
    ema: Any,
    timekeys: Any,
    thresholds: Any,
    s: Any,
    last: Any,
    trail: bool,
) -> Any:
    """The loop rules over steps t0..t0+W-1 of R jobs, on numpy (``xp=np``) or torch.

    ``losses`` [R, W]; per job the state before the window: ``ema`` [R], ``timekeys`` [R, K]
    (NaN: not crossed yet), ``thresholds`` [R, K] (descending), ``s`` [R] (EMA_SMOOTHER) and
    ``last`` [R] (MAX_ITER - 1). Returns one float64 array [R, K + 3 (+ 2W)]: the timekeys
    after the window, the exit step (-1: none), diverged (0/1), the EMA after the window and,
    with ``trail``, the EMA and the loss of every step (NaN after the exit): everything a host
    needs, in one piece, so that a device copies it once.
    """
    R, W = losses.shape
    x = _f64(xp, losses).T.copy() if xp is np else _f64(xp, losses).T.contiguous()  # [W, R]
    emas = xp.empty_like(x)
    u = (1 - s) * x  # (1-s)*loss for every step at once: elementwise, the same rounding
    tmp = xp.empty_like(ema)
    prev = ema
    for i in range(W):
        if t0 + i == 0:
            emas[0] = x[0]
        else:
            xp.multiply(s, prev, out=tmp)
            xp.add(tmp, u[i], out=emas[i])
        prev = emas[i]
    device = {} if xp is np else {"device": x.device}
    steps = xp.arange(t0, t0 + W, dtype=xp.float64, **device)[:, None]  # [W, 1]
    first_bad = xp.amin(xp.where(xp.isfinite(x), INF, steps), 0)  # [R]
    valid = (steps < first_bad) & (steps <= last)  # [W, R]: steps the loop took
    below = (emas[:, :, None] < thresholds[None]) & valid[:, :, None]  # [W, R, K]
    hit = xp.amin(xp.where(below, steps[:, :, None], INF), 0)  # [R, K]: first crossing here
    new = xp.where(xp.isnan(timekeys) & (hit < INF), hit, timekeys)
    done = xp.where(xp.isnan(new).any(1), INF, xp.amax(new, 1))  # every threshold crossed
    stop = xp.minimum(done, last)
    diverged = first_bad <= stop
    exit_step = xp.where(diverged, first_bad, stop)
    exit_step = xp.where(exit_step < t0 + W, exit_step, -1.0)
    # the EMA after the window: at the exit step, before a divergence, or at the window's end
    upto = xp.where(exit_step < 0, float(t0 + W - 1), exit_step) - _f64(xp, diverged)
    index = (upto - t0).clip(0, None) if xp is np else (upto - t0).clamp(min=0)
    index = index.astype(np.int64) if xp is np else index.long()
    final = xp.where(upto < t0, ema, emas[index, xp.arange(R, **device)])
    parts = [new, exit_step[:, None], _f64(xp, diverged)[:, None], final[:, None]]
    if trail:
        kept = valid & ((exit_step < 0) | (steps <= exit_step))
        parts += [xp.where(kept, emas, np.nan).T, xp.where(kept, x, np.nan).T]
    return xp.concatenate(parts, 1)
