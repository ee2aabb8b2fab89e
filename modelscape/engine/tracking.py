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
(setup excluded) to the record, divided by the number of jobs that trained together, plus the
seconds a checkpoint carried.
"""

from __future__ import annotations

import copy
import math
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modelscape.engine.setup import Problem, evaluate_grabs
from modelscape.jobs import Job
from modelscape.results import JobRecord


class Curves:
    """Per-step curves for ONLYTHRESHOLDS=False: EMA every step, tests and grabs on a cadence."""

    def __init__(self, max_iter: int):
        self.train = np.full(max_iter, np.nan)
        self.evals: dict[str, list[tuple[int, np.ndarray]]] = {}

    def state(self) -> dict[str, Any]:
        return {"train": self.train.copy(), "evals": copy.deepcopy(self.evals)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Curves:
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

    def consume(self, t0: int, values: Sequence[float]) -> None:
        """Apply the loop rules to the losses of steps t0, t0+1, ...; stops at the exit step."""
        hp = self.job.hp
        s = hp.EMA_SMOOTHER
        ema, crossed, thresholds = self.ema, self.crossed, self.thresholds
        for i, value in enumerate(values):
            step = t0 + i
            if not math.isfinite(value):
                self.diverged, self.exit = True, step
                break
            ema = value if step == 0 else s * ema + (1 - s) * value
            while crossed < len(thresholds) and ema < thresholds[crossed]:
                self.timekeys[crossed] = step
                crossed += 1
            if self.curves is not None:
                self.curves.train[step] = ema
            if hp.VERBOSE and step % hp.EVAL_EVERY == 0:
                say(f"[{self.job.label()}] step {step}: train loss {value:.4g} (ema {ema:.4g})")
            self.step = step
            if crossed == len(thresholds) or step == hp.MAX_ITER - 1:
                self.exit = step
                break
        self.ema = ema

    def loop_state(self, seconds: float) -> dict[str, Any]:
        """The loop's part of a checkpoint (the model's part is ``state.snapshot``)."""
        return {
            "step": self.step,
            "ema": self.ema,
            "timekeys": self.timekeys.copy(),
            "curves": None if self.curves is None else self.curves.state(),
            "seconds": seconds,
        }

    @classmethod
    def resume(cls, job: Job, state: Mapping[str, Any]) -> Track:
        """The track of a job continuing from a checkpoint's ``loop_state``."""
        track = cls.start(job)
        track.step, track.ema, track.seconds = state["step"], state["ema"], state["seconds"]
        track.timekeys = state["timekeys"].copy()
        track.curves = None if state["curves"] is None else Curves.from_state(state["curves"])
        return track


class Tracker:
    """The loop rules for ``tracks``, the jobs that train together from ``start`` on."""

    def __init__(self, tracks: Sequence[Track]):
        self.tracks = list(tracks)
        self.clock = time.perf_counter()

    def consume(self, t0: int, losses: torch.Tensor | Sequence[Sequence[float]], rows) -> None:
        """Feed the losses [len(rows) x steps] of steps t0...; row k belongs to ``rows[k]``.

        A job that exits inside the window ignores the losses after its exit step.
        """
        if isinstance(losses, torch.Tensor):
            losses = losses.to("cpu", torch.float64).tolist()  # the window's one host sync
        for r, values in zip(rows, losses):
            self.tracks[r].consume(t0, values)

    def seconds(self, track: Track) -> float:
        """The job's share of the wall time since training started (see the module docstring)."""
        return track.seconds + (time.perf_counter() - self.clock) / len(self.tracks)

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


def evaluate(problem: Problem, X: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, Any]:
    """What the curves record at an evaluation step: the test loss and every grab."""
    return {"test_loss": problem.test_loss(), **evaluate_grabs(problem, X, y, step)}


def failed_record(
    job: Job, err: BaseException, device: torch.device | str, trained_by: str = ""
) -> JobRecord:
    """The record of a job that raised: its message and traceback, nothing else."""
    return JobRecord(
        key=job.key,
        seed=job.seed,
        status="failed",
        device=str(device),
        timekeys=np.full(len(job.hp.LOSS_CHECKPOINTS), np.nan),
        error=f"{type(err).__name__}: {err}",
        traceback="".join(traceback.format_exception(err)),
        trained_by=trained_by,
    )


def say_resumed(job: Job, step: int) -> None:
    """The notice that a job continues from its checkpoint (every engine, on stderr)."""
    say(f"modelscape: resuming job ({job.label()}) from its checkpoint at step {step}", sys.stderr)


def say(text: str, file: Any = None) -> None:
    """Print a line without breaking a progress bar."""
    from tqdm import tqdm

    tqdm.write(text, file=file)
