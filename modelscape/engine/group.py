"""How a group of jobs trains on one device: stacked, or one job at a time and why.

``train_group`` is what every executor calls. It asks ``stacked.grouping.why_single`` (decided
from the jobs alone, before anything trains) and trains the group with ``stacked.refill`` (in
stacked runs) or the one-job ``loop``; every record's ``trained_by`` says which, and why a
stack was not used.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch

from modelscape.engine.allocator import keep_freed_memory
from modelscape.engine.failures import failed_record, failure_of
from modelscape.engine.loop import run_job
from modelscape.engine.stacked.grouping import STACKED, why_single
from modelscape.engine.stacked.refill import train_stacked
from modelscape.results.records import JobRecord
from modelscape.store.checkpoints import Checkpoints
from modelscape.sweep.jobs import Job
from modelscape.sweep.spec import SweepSpec


def train_group(
    jobs: Sequence[Job],
    spec: SweepSpec,
    device: torch.device,
    checkpoints: Checkpoints | None = None,
) -> Iterator[JobRecord]:
    """Train a group of jobs on one device, yielding each job's record as it finishes.

    A group the stacked engine can take trains as one model (a job's numbers then do not
    depend on which other jobs share its group); otherwise, and alone, jobs train one by one.
    With DETERMINISTIC=True, PyTorch's deterministic algorithms are on while the group trains
    (ops without a deterministic version warn instead of failing). Freed buffers stay in the
    process for the next step (``allocator.keep_freed_memory``).
    """
    keep_freed_memory()
    with deterministic_algorithms(jobs[0].hp.DETERMINISTIC):
        trained_by = why_single(jobs, device, spec)
        if trained_by is None:
            stacked = train_stacked(jobs, spec, device, checkpoints)
            yield from _exits_fail_the_rest(jobs, stacked, device)
            return
        for job in jobs:
            yield run_job(job, spec, device, checkpoints, trained_by)


def _exits_fail_the_rest(
    jobs: Sequence[Job], records: Iterator[JobRecord], device: torch.device
) -> Iterator[JobRecord]:
    """An exit raised in user code while a stack trains fails the jobs not yet reported."""
    done = set()
    try:
        for record in records:
            done.add(record.key)
            yield record
    except (SystemExit, KeyboardInterrupt) as err:
        failure = failure_of(err)  # or re-raised: it stops the sweep
        for job in jobs:
            if job.key not in done:
                yield failed_record(job, failure, device, STACKED)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` for a window, restoring the caller's setting.

    cuBLAS is deterministic only with a fixed workspace (CUBLAS_WORKSPACE_CONFIG), which it
    reads when it creates its handle, at a process's first matrix product on a device. The
    variable is set here, before the group's first step; DETERMINISTIC is the same for every
    job of a sweep's group and workers train one sweep, so no earlier product of the process ran
    without it unless the caller's own code did (then set the variable yourself).

    Deterministic mode's fill of uninitialized memory (NaN in every new float tensor, torch's
    net for kernels that read memory they never wrote) is off while the group trains: it is a
    debugging aid, not part of determinism, and it wrote every activation buffer twice (3,000
    extra fills in 64 steps of the built-in CNN, profiled). Reading ``torch.empty`` before
    writing it is a bug the fill would not fix either.
    """
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    before_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    before_fill = torch.utils.deterministic.fill_uninitialized_memory
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = before_fill
