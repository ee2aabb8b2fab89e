"""The loop rules, once for every engine: what happens to a job's losses after each step.

A ``Tracker`` follows the jobs that train together (one in the one-job loop, many in a stack).
It consumes the train losses of a window of steps as a [jobs x steps] array and applies, per job:

- the EMA of the train loss: ``ema = s*ema + (1-s)*loss`` (EMA_SMOOTHER), starting at the first
  loss;
- timekeys: the first step whose EMA is below each threshold (step numbers are 0-based; a timekey
  of 0 means the first loss was already below it);
- the exits: diverged at a non-finite loss; done once every threshold is crossed, or at MAX_ITER;
- the curves (ONLYTHRESHOLDS=False): the EMA every step, the test loss and grabs at evaluation
  steps (``eval_due``);
- the VERBOSE line.

It also owns what the loop state is in a checkpoint (``loop_state``/``resume``) and how a job's
record is assembled (``finish``). ``seconds`` in a record: wall time from the start of training
(setup excluded), or from when the job joined a running stack, to the record, divided by the
number of jobs that trained at once, plus the seconds a checkpoint carried.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modelscape.engine.setup import Problem, evaluate_grabs
from modelscape.results.records import JobRecord
from modelscape.sweep.jobs import Job

# Steps per window: the losses of a window are copied to the host and consumed at once (the only
# sync), by the stacked engine and the one-job loop alike.
SYNC_EVERY = 32


class Curves:
    """Per-step curves for ONLYTHRESHOLDS=False: EMA every step, tests and grabs on a cadence."""

    def __init__(self, max_iter: int):
        self.train = np.full(max_iter, np.nan)
        self.evals: dict[str, list[tuple[int, np.ndarray]]] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"train": self.train.copy(), "evals": copy.deepcopy(self.evals)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Curves:
        curves = cls(state["train"].shape[0])
        curves.train = state["train"].copy()
        curves.evals = copy.deepcopy(state["evals"])
        return curves

    def add_eval(self, step: int, values: Mapping[str, Any]) -> None:
        for k, v in values.items():
            self.evals.setdefault(k, []).append((step, np.asarray(v)))

    def finish(self, last_step: int, diverged: bool) -> dict[str, np.ndarray]:
        n = self.train.shape[0]
        # a job that diverged at its first step was never evaluated: its test curve is all NaN
        out = {"train_loss": self.train.copy(), "test_loss": np.full(n, np.nan)}
        if not diverged:
            out["train_loss"][last_step + 1 :] = self.train[last_step]
        for k, points in self.evals.items():
            arr = np.full((n,) + points[0][1].shape, np.nan)
            for (s, v), nxt in zip(points, points[1:] + [(None, None)]):
                end = nxt[0] if nxt[0] is not None else (last_step + 1 if diverged else n)
                arr[s:end] = v
            out[k] = arr
        return out


@dataclass
class Track:
    """One job's loop state: where it stands after ``step`` (-1: before its first step)."""

    job: Job
    thresholds: list[float]  # descending, so they are crossed in order
    timekeys: np.ndarray  # per threshold of ``thresholds``
    curves: Curves | None
    step: int = -1
    ema: float = math.nan
    seconds: float = 0.0  # carried over from a checkpoint
    exit: int | None = None  # the step the job stopped at
    diverged: bool = False

    @classmethod
    def start(cls, job: Job) -> Track:
        hp = job.hp
        thresholds = sorted(hp.LOSS_CHECKPOINTS, reverse=True)
        curves = None if hp.ONLYTHRESHOLDS else Curves(hp.MAX_ITER)
        return cls(job, thresholds, np.full(len(thresholds), np.nan), curves)

    @property
    def crossed(self) -> int:
        return int(np.count_nonzero(~np.isnan(self.timekeys)))

    def eval_due(self, step: int) -> bool:
        """Whether the test loss and grabs are recorded in the curves after ``step``."""
        if self.curves is None or self.diverged:
            return False
        return step % self.job.hp.EVAL_EVERY == 0 or self.exit == step

    def state_dict(self, seconds: float) -> dict[str, Any]:
        """The loop's part of a checkpoint (the model's part is ``state.job_state_dict``)."""
        return {
            "step": self.step,
            "ema": self.ema,
            "timekeys": self.timekeys.copy(),
            "curves": None if self.curves is None else self.curves.state_dict(),
            "seconds": seconds,
        }

    @classmethod
    def from_state_dict(cls, job: Job, state: Mapping[str, Any]) -> Track:
        """The track of a job continuing from a checkpoint's ``loop_state``."""
        track = cls.start(job)
        track.step, track.ema, track.seconds = state["step"], state["ema"], state["seconds"]
        track.timekeys = state["timekeys"].copy()
        track.curves = None if state["curves"] is None else Curves.from_state_dict(state["curves"])
        return track


class Tracker:
    """The loop rules for ``tracks``, the jobs that train together from ``start`` on."""

    def __init__(self, tracks: Sequence[Track]):
        self.tracks = list(tracks)
        self.clock = time.perf_counter()
        self.width = len(self.tracks)  # the most jobs that trained at once
        self._joined: dict[int, float] = {}  # id(track) -> the clock when it joined (refill)

    def join(self, tracks: Sequence[Track], width: int) -> None:
        """Follow ``tracks`` too: jobs that joined the running stack, which is now ``width``
        jobs wide."""
        now = time.perf_counter()
        for track in tracks:
            self._joined[id(track)] = now
            self.tracks.append(track)
        self.width = max(self.width, width)

    def consume(
        self, t0: int | Sequence[int], losses: torch.Tensor | Sequence[Sequence[float]], rows
    ) -> None:
        """Apply the loop rules to the losses [len(rows) x steps] of steps t0...; row k
        belongs to ``rows[k]`` (``t0``: one first step for every row, or one per row, for rows
        that joined a stack at different steps). A job that exits inside the window ignores
        the losses after its exit step.

        On a GPU the rules run where the losses are (``scan``, vectorized over the jobs) and
        one copy brings back what is recorded; host losses (a CPU stack or one job) run the
        same ``scan`` on numpy.
        """
        tracks = [self.tracks[r] for r in rows]
        xp = torch if isinstance(losses, torch.Tensor) and losses.device.type != "cpu" else np
        if xp is np:
            losses = losses.numpy() if isinstance(losses, torch.Tensor) else np.asarray(losses)
        width = losses.shape[1]
        starts = [t0] * len(tracks) if isinstance(t0, int) else list(t0)
        trail = any(t.curves is not None or t.job.hp.VERBOSE for t in tracks)
        ema, timekeys, thresholds, s, last, first = self._state(xp, tracks, losses, starts)
        with np.errstate(invalid="ignore"):  # NaN losses are expected (divergence)
            packed = scan(xp, first, losses, ema, timekeys, thresholds, s, last, trail)
        if xp is torch:
            packed = packed.cpu().numpy()  # the window's one host sync
        k = timekeys.shape[1]
        for track, row, t0 in zip(tracks, packed, starts):
            track.timekeys = row[:k].copy()
            exit_step, diverged, track.ema = int(row[k]), bool(row[k + 1]), float(row[k + 2])
            if exit_step >= 0:
                track.exit, track.diverged = exit_step, diverged
            track.step = exit_step - diverged if exit_step >= 0 else t0 + width - 1
            if trail:
                self._record_trail(track, t0, row[k + 3 : k + 3 + width], row[k + 3 + width :])

    @staticmethod
    def _state(xp, tracks: Sequence[Track], losses, starts: Sequence[int]):
        """The tracks' state before the window (and its first step), as arrays on the losses'
        device."""
        ema = np.array([t.ema for t in tracks], dtype=np.float64)
        timekeys = np.stack([t.timekeys for t in tracks]).astype(np.float64)
        thresholds = np.array([t.thresholds for t in tracks], dtype=np.float64)
        s = np.array([t.job.hp.EMA_SMOOTHER for t in tracks], dtype=np.float64)
        last = np.array([t.job.hp.MAX_ITER - 1 for t in tracks], dtype=np.float64)
        arrays = (ema, timekeys, thresholds, s, last, np.array(starts, dtype=np.float64))
        if xp is np:
            return arrays
        return [torch.as_tensor(a).to(losses.device, non_blocking=True) for a in arrays]

    @staticmethod
    def _record_trail(track: Track, t0: int, emas: np.ndarray, values: np.ndarray) -> None:
        """The curves' EMA and the VERBOSE lines of the steps the job took in the window."""
        hp = track.job.hp
        taken = int(np.count_nonzero(~np.isnan(emas)))
        if track.curves is not None:
            track.curves.train[t0 : t0 + taken] = emas[:taken]
        if hp.VERBOSE:
            for i in range(taken):
                if (t0 + i) % hp.EVAL_EVERY == 0:
                    line = f"train loss {values[i]:.4g} (ema {emas[i]:.4g})"
                    say(f"[{track.job.label()}] step {t0 + i}: {line}")

    def seconds(self, track: Track) -> float:
        """The job's share of the wall time since training started (see the module docstring)."""
        start = self._joined.get(id(track), self.clock)
        return track.seconds + (time.perf_counter() - start) / self.width

    def finish(
        self,
        track: Track,
        problem: Problem,
        batch: tuple[torch.Tensor, torch.Tensor] | None,
        trained_by: str,
    ) -> JobRecord:
        """The record of a job that exited, with ``problem.model`` at its exit-step values."""
        step = track.exit
        record = JobRecord(
            key=track.job.key,
            seed=track.job.seed,
            status="diverged" if track.diverged else "ok",
            timekeys=track.timekeys,
            steps=step + 1,
            device=str(problem.device),
            trained_by=trained_by,
        )
        if track.diverged:
            if track.curves is not None:
                record.curves = track.curves.finish(step - 1, diverged=True)
        else:
            record.train_loss = track.ema
            record.test_loss = problem.test_loss()
            record.grabs = evaluate_grabs(problem, *batch, step) if problem.grabs else {}
            if track.curves is not None:
                record.curves = track.curves.finish(step, diverged=False)
        record.seconds = self.seconds(track)
        return record


INF = float("inf")


def _f64(xp: Any, a: Any) -> Any:
    return a.to(torch.float64) if xp is torch else np.asarray(a, dtype=np.float64)


def scan(
    xp: Any,
    t0: Any,
    losses: Any,
    ema: Any,
    timekeys: Any,
    thresholds: Any,
    s: Any,
    last: Any,
    trail: bool,
) -> Any:
    """The loop rules over steps t0..t0+W-1 of R jobs, on numpy (``xp=np``) or torch.

    ``t0``: the first step of the window, for every job or per job [R] (jobs that joined a
    stack at different steps). ``losses`` [R, W]; per job the state before the window:
    ``ema`` [R], ``timekeys`` [R, K] (NaN: not crossed yet), ``thresholds`` [R, K]
    (descending), ``s`` [R] (EMA_SMOOTHER) and ``last`` [R] (MAX_ITER - 1). Returns one
    float64 array [R, K + 3 (+ 2W)]: the timekeys after the window, the exit step (-1: none),
    diverged (0/1), the EMA after the window and, with ``trail``, the EMA and the loss of every
    step (NaN after the exit): everything a host needs, in one piece, so that a device copies
    it once.
    """
    R, W = losses.shape
    x = _f64(xp, losses).T  # [W, R]: a step across the jobs
    device = {} if xp is np else {"device": x.device}
    if isinstance(t0, int):
        t0 = xp.full((R,), float(t0), dtype=xp.float64, **device)
    emas = xp.empty_like(x)
    u = (1 - s) * x  # (1-s)*loss for every step at once: elementwise, the same rounding
    tmp = xp.empty_like(ema)
    prev = ema
    for i in range(W):
        xp.multiply(s, prev, out=tmp)
        xp.add(tmp, u[i], out=emas[i])
        if i == 0:  # a job's first step starts its EMA at its loss
            emas[0] = xp.where(t0 == 0, x[0], emas[0])
        prev = emas[i]
    steps = t0[None, :] + xp.arange(W, dtype=xp.float64, **device)[:, None]  # [W, R]
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
    upto = xp.where(exit_step < 0, t0 + (W - 1), exit_step) - _f64(xp, diverged)
    index = (upto - t0).clip(0, None) if xp is np else (upto - t0).clamp(min=0)
    index = index.astype(np.int64) if xp is np else index.long()
    final = xp.where(upto < t0, ema, emas[index, xp.arange(R, **device)])
    parts = [new, exit_step[:, None], _f64(xp, diverged)[:, None], final[:, None]]
    if trail:
        kept = valid & ((exit_step < 0) | (steps <= exit_step))
        parts += [xp.where(kept, emas, np.nan).T, xp.where(kept, x, np.nan).T]
    return xp.concatenate(parts, 1)


def evaluate(problem: Problem, X: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, Any]:
    """What the curves record at an evaluation step: the test loss and every grab."""
    return {"test_loss": problem.test_loss(), **evaluate_grabs(problem, X, y, step)}


def say_resumed(job: Job, step: int) -> None:
    """The notice that a job continues from its checkpoint (every engine, on stderr)."""
    say(f"modelscape: resuming job ({job.label()}) from its checkpoint at step {step}", sys.stderr)


def say(text: str, file: Any = None) -> None:
    """Print a line without breaking a progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(text, file=file)
