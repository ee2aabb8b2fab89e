"""How compatible jobs train together as one stacked model (placeholder: nothing batches yet)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from modelscape.checkpoint import Checkpoints
from modelscape.jobs import Job
from modelscape.results import JobRecord
from modelscape.sweep import SweepSpec


def group_jobs(jobs: Sequence[Job]) -> list[list[Job]]:
    """Split jobs into groups that can train as one stacked model (each job alone for now)."""
    return [[job] for job in jobs]


def can_batch(jobs: Sequence[Job], spec: SweepSpec) -> bool:
    """True when this group can be trained by ``train_batched``."""
    return False


def train_batched(
    jobs: Sequence[Job],
    spec: SweepSpec,
    device: torch.device,
    checkpoints: Checkpoints | None = None,
) -> Iterator[JobRecord]:
    raise NotImplementedError
