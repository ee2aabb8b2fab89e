"""Where jobs run. An executor takes groups of jobs and hands each finished record back.

``InProcessExecutor`` trains in the calling process on one device: the debug executor, and the
default when a sweep has one worker.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from modelscape.engine import train_group
from modelscape.jobs import Job
from modelscape.results import JobRecord
from modelscape.sweep import SweepSpec

OnRecord = Callable[[JobRecord], None]


class Executor(ABC):
    """Runs groups of jobs somewhere and calls ``on_record`` in this process for each result."""

    @abstractmethod
    def run(self, groups: Sequence[Sequence[Job]], spec: SweepSpec, on_record: OnRecord) -> None:
        """Train every group; return once every job's record has been passed to ``on_record``."""


class InProcessExecutor(Executor):
    """Train every group in this process, one after another, on ``device``."""

    def __init__(self, device: torch.device):
        self.device = device

    def run(self, groups: Sequence[Sequence[Job]], spec: SweepSpec, on_record: OnRecord) -> None:
        for group in groups:
            for record in train_group(group, spec, self.device):
                on_record(record)
