"""The ``Executor`` base class: the work every backend shares.

``Executor.run`` packs the sweep into one ``Payload`` (pickled when the backend trains in other
processes), hands it to the backend's ``_run``, and streams every record to the caller through
``Records``, which also turns the jobs of a group that never produced a record into failed
records. A backend overrides only ``_run`` (and, where it differs, ``placement``,
``from_hparams``, ``check`` and ``collect``), as submitit's executors override one method each;
shared code reaches a backend only through these methods and the registry, never by name.

Every executor produces the same records: a job's seed and data depend only on its identity,
never on the worker or the order.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from modelscape.engine import failed_record, resolve_device
from modelscape.errors import ExecutorError
from modelscape.execution import executor_class
from modelscape.execution.pickling import Payload
from modelscape.execution.progress import notice
from modelscape.results.records import JobRecord
from modelscape.store.checkpoints import Checkpoints
from modelscape.sweep import hparams as H
from modelscape.sweep.jobs import Job
from modelscape.sweep.spec import SweepSpec

OnRecord = Callable[[JobRecord], None]


class Records:
    """The caller's end of a sweep: passes each record on as it arrives, and knows which jobs of
    each group (by index) still have none."""

    def __init__(self, groups: Sequence[Sequence[Job]], on_record: OnRecord):
        self._left = [{job.key: job for job in group} for group in groups]
        self._on_record = on_record

    def add(self, gid: int, record: JobRecord) -> None:
        """Hand ``record``, from group ``gid``, to the caller."""
        self._left[gid].pop(record.key, None)
        self._on_record(record)

    def fail_rest(self, gid: int, err: BaseException, device: str) -> None:
        """Record every job of group ``gid`` that has no record yet as failed with ``err``."""
        for job in list(self._left[gid].values()):
            self.add(gid, failed_record(job, err, device))

    def left(self, gid: int) -> list[Job]:
        """The jobs of group ``gid`` that have no record yet."""
        return list(self._left[gid].values())

    def regroup(self, gid: int, jobs: Sequence[Job]) -> None:
        """Move ``jobs`` of group ``gid`` into a new group, numbered after the last (a retry)."""
        for job in jobs:
            self._left[gid].pop(job.key, None)
        self._left.append({job.key: job for job in jobs})

    def unfinished(self) -> list[int]:
        """The groups with jobs still lacking a record."""
        return [gid for gid, left in enumerate(self._left) if left]


class Executor(ABC):
    """Runs groups of jobs somewhere and calls ``on_record`` in this process for each result.

    ``pickles``: whether jobs train in other processes, so the payload must be pickled first.
    ``stops_hung_jobs``: whether it honours JOB_TIMEOUT. ``waits``: whether ``run`` returns only
    once every job has a record (a detached SLURM sweep returns after submitting).
    ``inherits_spec`` and ``shares_out_pairs``: see their comments.
    """

    pickles: ClassVar[bool] = True
    stops_hung_jobs: ClassVar[bool] = False
    waits: bool = True
    inherits_spec: bool = False  # its workers are forks of this process (``Payload.pickle``)
    #: long-lived workers that pull one group after another: one-at-a-time jobs are sent in
    #: pairs, so that they share out as workers finish (``runner.balance``); a backend that
    #: starts a process or task per group keeps fewer, larger groups
    shares_out_pairs: ClassVar[bool] = False

    def __init__(self, checkpoints: Checkpoints | None = None):
        self.checkpoints = checkpoints

    @classmethod
    def from_hparams(
        cls, hp: H.HParams, *, use_mp: bool | None = None, checkpoints: Checkpoints | None = None
    ) -> Executor:
        """The executor for DEVICES and WORKERS_PER_DEVICE (``use_mp``: the original's flag)."""
        return cls(hp.DEVICES, hp.WORKERS_PER_DEVICE, checkpoints)  # type: ignore[call-arg]

    @classmethod
    def check(cls, hp: H.HParams) -> None:
        """Refuse, before anything trains, settings this executor cannot honour."""
        if hp.JOB_TIMEOUT > 0 and not cls.stops_hung_jobs:
            raise ExecutorError(
                f"JOB_TIMEOUT stops hung jobs on local worker processes only; with EXECUTOR="
                f"{hp.EXECUTOR!r} set JOB_TIMEOUT=0."
            )

    @classmethod
    def collect(cls, run_dir: str | os.PathLike) -> str | None:
        """Store the records this executor's jobs left in ``run_dir`` without a sweep process
        to receive them; a one-line summary, or None when it left none (``modelscape show``)."""
        return None

    def run(self, groups: Sequence[Sequence[Job]], spec: SweepSpec, on_record: OnRecord) -> None:
        """Train every group; return once every job's record has been passed to ``on_record``
        (unless the executor does not ``wait``: then once every group is on its way)."""
        payload = Payload(spec, groups)
        if self.pickles:
            # before any worker starts, so that a bad object fails fast
            payload.pickle(spec=not self.inherits_spec)
        records = Records(payload.groups, on_record)
        self._run(payload, records)
        if not self.waits:
            return
        for gid in records.unfinished():  # nothing a backend forgets goes unreported
            lost = RuntimeError(f"the {type(self).__name__} returned no record for this job.")
            records.fail_rest(gid, lost, "unknown")

    @abstractmethod
    def _run(self, payload: Payload, records: Records) -> None:
        """Train every group of ``payload``, passing each record to ``records.add``."""

    def placement(self) -> list[str]:
        """The device of each worker, for the progress bar."""
        return []


def executor_for(
    hp: H.HParams, *, use_mp: bool | None = None, checkpoints: Checkpoints | None = None
) -> Executor:
    """The executor EXECUTOR, DEVICES and WORKERS_PER_DEVICE ask for.

    One worker in total trains in this process, several in worker processes; ``use_mp``
    (the original's flag) forces one or the other. WORKERS_PER_DEVICE="auto" needs the sweep's
    groups (``local.workers_per_device``); without them it is one.
    """
    cls = executor_class(hp.EXECUTOR)
    if hp.WORKERS_PER_DEVICE == "auto":  # the runner decides it from the sweep's groups
        hp = dataclasses.replace(hp, WORKERS_PER_DEVICE=1)
    cls.check(hp)
    return cls.from_hparams(hp, use_mp=use_mp, checkpoints=checkpoints)


def local_device(spec: int | str) -> torch.device:
    """The torch device of a DEVICES entry, saying so when a CUDA id falls back to the CPU."""
    device = resolve_device(spec)
    if spec != "cpu" and device.type == "cpu":
        notice(f"CUDA is not available; DEVICES entry {spec} runs on the CPU.")
    return device


def join_sys_path(parent: Sequence[str]) -> None:
    """Put the parent's ``sys.path`` first, so that functions pickled by reference (from the
    user's modules) import in a worker as they do in the parent."""
    sys.path[:] = list(parent) + [p for p in sys.path if p not in parent]
