"""Refill: the jobs of a group that wait for rows of a running stack (REFILL=True).

With REFILL a group is not capped (``grouping.group_jobs``): it trains as a stream, as many
jobs at once as the caps of a group allow (``MAX_GROUP``, the memory budget and, on CUDA, the
device's free memory), and a job that waits joins the running stack when a row frees up. It
starts at its own step 0 (or its checkpoint's step) with its own data, weights and optimizer
state; the stack's rows then take different steps (``Stack.offsets``), so a job's numbers do
not depend on when it joined. ``Waiting`` holds the jobs not yet in a stack and sets each up
when it joins; its record's ``joined_at`` is the stack's step count when it joined.
With REFILL=False a group trains whole, as before.
"""

from __future__ import annotations

import contextlib
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import torch

from modelscape.engine import precision
from modelscape.engine.failures import failed_record, failure_boundary
from modelscape.engine.loop import train
from modelscape.engine.setup import kept_global_rngs, setup_job
from modelscape.engine.stacked import grouping, memory
from modelscape.engine.stacked.footprint import job_bytes
from modelscape.engine.stacked.grouping import GROUP_BYTES, STACKED, device_budget, refuse
from modelscape.engine.stacked.run import Run, can_share
from modelscape.engine.stacked.stack import Unbatchable
from modelscape.engine.state import load_checkpoint
from modelscape.engine.tracking import SYNC_EVERY, say
from modelscape.results.records import JobRecord
from modelscape.store.checkpoints import Checkpoints
from modelscape.sweep.jobs import Job
from modelscape.sweep.spec import SweepSpec

Item = tuple  # (Problem, Track, GlobalRngs | None): a set-up job, ready to train


class Waiting:
    """The jobs of a group that are not in a stack yet, in order, and how many fit at once.

    ``width``: the most jobs of a stack (None: the caps of a group decide). With REFILL=False
    every job fits: the group trains whole, as one stack.
    """

    def __init__(
        self,
        jobs: Sequence[Job],
        spec: SweepSpec,
        device: torch.device,
        checkpoints: Checkpoints | None,
        group_bytes: int = GROUP_BYTES,
        width: int | None = None,
    ):
        self.jobs: deque[Job] = deque(jobs)
        self.ready: deque[Item] = deque()  # set up, but could not join the stack
        self.spec, self.device, self.checkpoints = spec, device, checkpoints
        self.refill = bool(jobs) and jobs[0].hp.REFILL
        self.width = grouping.MAX_GROUP if width is None else width
        self.budget = device_budget(jobs[0]) if group_bytes == GROUP_BYTES else group_bytes
        self.free = float("inf")
        if self.refill and device.type == "cuda":
            self.free = memory.HEADROOM * torch.cuda.mem_get_info(device)[0]
        # matmul settings as the caller has them: a job is set up as in the one-job loop
        self.tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        self.widest = 0  # the most jobs that trained at once
        # job key -> (job_bytes, memory.per_job): ``fits`` sums them over the running jobs at
        # every join (the measured footprint changes only once the stream ends, memory.Footprint)
        self.sizes: dict[tuple, tuple[int, float]] = {}

    def __bool__(self) -> bool:
        return bool(self.jobs or self.ready)

    def fits(self, running: Sequence[Job], job: Job) -> bool:
        """Whether ``job`` may join a stack of ``running`` jobs."""
        if not self.refill or not running:
            return True
        if len(running) >= self.width:
            return False
        estimated, measured = (sum(s) for s in zip(*map(self._sizes, [*running, job])))
        return estimated <= self.budget and measured <= self.free

    def _sizes(self, job: Job) -> tuple[int, float]:
        if job.key not in self.sizes:
            self.sizes[job.key] = job_bytes(job, self.spec), memory.per_job(job, self.spec)
        return self.sizes[job.key]

    def first(self) -> list[Job]:
        """The jobs a fresh stack starts with (for ``memory.Footprint``)."""
        running: list[Job] = [item[0].job for item in self.ready]
        for job in self.jobs:
            if not self.fits(running, job):
                break
            running.append(job)
        return running

    def take(
        self, running: Sequence[Job], joins: Callable[[Item], bool]
    ) -> Iterator[Item | JobRecord]:
        """Set up the next jobs that fit beside ``running``, yielding each (or its failed
        record, when its setup fails); one that ``joins`` refuses waits for the next stack."""
        running = list(running)
        kept: list[Item] = []
        while self.ready and self.fits(running, self.ready[0][0].job):
            item = self.ready.popleft()
            if joins(item):
                running.append(item[0].job)
                yield item
            else:
                kept.append(item)
        while self.jobs and not kept and self.fits(running, self.jobs[0]):
            job = self.jobs.popleft()
            with failure_boundary(job, self.device, STACKED, passes=torch.OutOfMemoryError) as f:
                with self._caller_matmuls():
                    problem = setup_job(job, self.spec, self.device)
                item = (problem, *load_checkpoint(problem, self.checkpoints))
            if f.record is not None:
                yield f.record
            elif joins(item):
                running.append(job)
                yield item
            else:
                kept.append(item)
        self.ready.extendleft(reversed(kept))
        self.widest = max(self.widest, len(running))

    @contextlib.contextmanager
    def _caller_matmuls(self) -> Iterator[None]:
        before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def train_stacked(
    jobs: Sequence[Job],
    spec: SweepSpec,
    device: torch.device,
    checkpoints: Checkpoints | None = None,
    *,
    sync_every: int = SYNC_EVERY,
    group_bytes: int = GROUP_BYTES,
    width: int | None = None,
) -> Iterator[JobRecord]:
    """Train ``jobs`` as one stacked model on ``device``, yielding each record as it finishes.

    A job whose setup fails gets a failed record; the rest still train together. With
    ``checkpoints``, each running job is saved under its own key in the one-job loop's format,
    so a job resumes here or in ``loop.train`` alike; jobs resumed from different steps share
    a stack, each at its own step. A group whose built models cannot share a stack
    (``Unbatchable``) trains one job at a time, and its records say why. With REFILL the group
    trains as a stream of at most ``width`` jobs at once (``refill``); without, on CUDA, in
    chunks that fit the device's free memory (``memory.chunks``). A stack that runs out of
    memory anyway is split in two (with REFILL: made half as wide) and its unfinished jobs
    start again (from their checkpoints, if any).
    """
    jobs = list(jobs)
    done: set = set()
    refill = jobs[0].hp.REFILL
    waiting = None
    try:
        for chunk in [jobs] if refill else memory.chunks(jobs, device, spec):
            waiting = Waiting(chunk, spec, device, checkpoints, group_bytes, width)
            for record in _train_jobs(waiting, sync_every, group_bytes):
                done.add(record.key)
                yield record
    except torch.OutOfMemoryError:
        # A stack too large for the device: the jobs not reported yet train again, from their
        # start (or checkpoint), in two halves; their numbers do not depend on the stack.
        left = [job for job in jobs if job.key not in done]
        memory.release(device)
        if len(left) == 1 or (refill and waiting.widest < 2):
            for job in left:
                yield from _train_alone_or_fail(job, spec, device, checkpoints, sync_every)
            return
        say(f"modelscape: out of memory in a stack of {len(left)} jobs; splitting it.", sys.stderr)
        if refill:
            parts, width = [left], waiting.widest // 2
        else:
            half = (len(left) + 1) // 2
            parts = [left[:half], left[half:]]
        for part in parts:
            yield from train_stacked(
                part,
                spec,
                device,
                checkpoints,
                sync_every=sync_every,
                group_bytes=group_bytes,
                width=width,
            )


def _train_alone_or_fail(job, spec, device, checkpoints, sync_every):
    """A job whose stack of one ran out of memory: once more (memory was released), then a
    failed record."""
    try:
        waiting = Waiting([job], spec, device, checkpoints)
        yield from _train_jobs(waiting, sync_every, GROUP_BYTES)
    except torch.OutOfMemoryError as err:
        yield failed_record(job, err, device, STACKED)


def _train_jobs(waiting: Waiting, sync_every, group_bytes):
    """Set up and train jobs that fit the device together, measuring their footprint."""
    with memory.Footprint(waiting.first(), waiting.device):
        yield from _set_up_and_train(waiting, sync_every, group_bytes)


def _set_up_and_train(waiting: Waiting, sync_every, group_bytes):
    device, checkpoints = waiting.device, waiting.checkpoints
    with kept_global_rngs(device), precision.matmuls(waiting.jobs[0].hp.PRECISION):
        if checkpoints is not None:
            checkpoints.reset_clock()
        while waiting:
            part: list = []

            def starts(item, part=part) -> bool:
                return not part or can_share(part[0][0], item[0])

            for item in waiting.take([], starts):
                if isinstance(item, JobRecord):
                    yield item
                else:
                    part.append(item)
            if part:
                yield from _train_part(part, waiting, device, checkpoints, sync_every, group_bytes)


def _train_part(part, waiting, device, checkpoints, sync_every, group_bytes):
    """Train jobs stacked if their models allow it, refilled from ``waiting``."""
    try:
        run = Run(part, waiting.spec, device, checkpoints, sync_every, group_bytes, waiting)
    except Unbatchable as why:
        trained_by = refuse(part[0][0].job, str(why))
        for p, _, _ in part:
            with failure_boundary(p.job, p.device, trained_by, lambda p=p: p.step) as failed:
                record = train(p, checkpoints, trained_by)
            yield record if failed.record is None else failed.record
        return
    try:
        yield from run.records()
    except torch.OutOfMemoryError:
        raise  # train_stacked splits the stack
    except Exception as err:  # noqa: BLE001 - the group's unfinished jobs become failed records
        for r in run.stack.rows if run.stack is not None else []:
            if run.tracks[r].exit is None:  # not reported yet
                step = run.step - run.offsets[r]
                yield failed_record(run.problems[r].job, err, device, STACKED, step)
