"""Where jobs run. An executor takes groups of jobs and hands each finished record back.

``InProcessExecutor`` trains in the calling process on one device: the debug executor, and the
default when a sweep has one worker.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from modelscape import hparams as H
from modelscape.checkpoint import Checkpoints
from modelscape.engine import resolve_device, train_group
from modelscape.jobs import Job
from modelscape.results import JobRecord
from modelscape.sweep import SweepSpec

OnRecord = Callable[[JobRecord], None]


class Executor(ABC):
    """Runs groups of jobs somewhere and calls ``on_record`` in this process for each result."""

    @abstractmethod
    def run(self, groups: Sequence[Sequence[Job]], spec: SweepSpec, on_record: OnRecord) -> None:
        """Train every group; return once every job's record has been passed to ``on_record``."""

    def placement(self) -> list[str]:
        """The device of each worker, for the progress bar."""
        return []


class InProcessExecutor(Executor):
    """Train every group in this process, one after another, on ``device``."""

    def __init__(self, device: torch.device, checkpoints: Checkpoints | None = None):
        self.device = device
        self.checkpoints = checkpoints

    def run(self, groups: Sequence[Sequence[Job]], spec: SweepSpec, on_record: OnRecord) -> None:
        for group in groups:
            for record in train_group(group, spec, self.device, self.checkpoints):
                on_record(record)

    def placement(self) -> list[str]:
        return [str(self.device)]


def executor_for(
    hp: H.HParams, *, use_mp: bool | None = None, checkpoints: Checkpoints | None = None
) -> Executor:
    """The executor EXECUTOR, DEVICES and WORKERS_PER_DEVICE ask for."""
    devices = [_device(d) for d in hp.DEVICES]
    return InProcessExecutor(devices[0], checkpoints)


def _device(spec: int | str) -> torch.device:
    device = resolve_device(spec)
    if spec != "cpu" and device.type == "cpu":
        print(
            f"modelscape: CUDA is not available; DEVICES entry {spec} runs on the CPU.",
            file=sys.stderr,
        )
    return device
