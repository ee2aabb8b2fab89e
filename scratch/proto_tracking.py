"""PROTOTYPE: the loop rules for a window of steps, vectorized over jobs (and over steps where
the rules allow), on the device the losses live on. Exact: the EMA recursion runs step by
step in float64 with the reference's operation order (s*ema + (1-s)*loss), so every EMA and
timekey equals the scalar loop's bit for bit.

Inputs per window, one row per job: the float losses [R, W] of steps t0..t0+W-1, and the
state the host keeps: ema [R], timekeys [R, K] (NaN = not crossed), thresholds [R, K]
(descending), s [R], last step allowed (MAX_ITER - 1) [R]. Returns one packed float64 tensor
[R, K + 3 (+ W)]: new timekeys, exit step (-1: none), diverged (0/1), final EMA, and (when
curves are recorded) the EMA of every step; the caller copies it to the host once.
"""

from __future__ import annotations

import torch


def scan(
    t0: int,
    losses: torch.Tensor,
    ema: torch.Tensor,
    timekeys: torch.Tensor,
    thresholds: torch.Tensor,
    s: torch.Tensor,
    last: torch.Tensor,
    trail: bool,
) -> torch.Tensor:
    R, W = losses.shape
    x = losses.to(torch.float64).T.contiguous()  # [W, R]: a step's row is contiguous
    emas = torch.empty_like(x)
    u = (1 - s) * x  # (1-s)*loss for every step at once: elementwise, same rounding
    tmp = torch.empty_like(ema)
    prev = ema
    for i in range(W):
        if t0 + i == 0:
            emas[0].copy_(x[0])
        else:
            torch.mul(s, prev, out=tmp)
            torch.add(tmp, u[i], out=emas[i])
        prev = emas[i]
    steps = torch.arange(t0, t0 + W, device=x.device, dtype=torch.float64)[:, None]  # [W, 1]
    bad = ~torch.isfinite(x)
    big = torch.tensor(float("inf"), dtype=torch.float64, device=x.device)
    first_bad = torch.where(bad, steps, big).amin(0)  # [R]
    valid = (steps < first_bad) & (steps <= last)  # [W, R]
    below = (emas[:, :, None] < thresholds[None]) & valid[:, :, None]  # [W, R, K]
    hit = torch.where(below, steps[:, :, None], big).amin(0)  # [R, K]: first crossing here
    new = torch.where(torch.isnan(timekeys) & torch.isfinite(hit), hit, timekeys)
    done = torch.where(torch.isnan(new).any(1), big, new.amax(1))  # all crossed: at this step
    stop = torch.minimum(done, last)
    diverged = first_bad <= stop
    exit_step = torch.where(diverged, first_bad, stop)
    exit_step = torch.where(exit_step < t0 + W, exit_step, torch.full_like(exit_step, -1.0))
    # the EMA after the window: at the exit step, before a divergence, or at the window's end
    upto = torch.where(exit_step < 0, torch.full_like(exit_step, t0 + W - 1), exit_step)
    upto = upto - diverged.to(torch.float64)
    idx = (upto - t0).clamp(min=0).long()
    final = torch.where(upto < t0, ema, emas.gather(0, idx[None])[0])
    parts = [new, exit_step[:, None], diverged.to(torch.float64)[:, None], final[:, None]]
    if trail:
        kept = valid & ((exit_step < 0) | (steps <= exit_step))
        parts.append(torch.where(kept, emas, torch.nan).T)
    return torch.cat(parts, 1)
