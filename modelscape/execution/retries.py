"""Retries of jobs lost to a dead worker process: who is retried, in which groups, who fails.

A worker killed by a signal (the OOM killer, a segfault, a SIGKILL) loses the jobs it had not
finished. Each such job is retried from its checkpoint up to MAX_RETRIES times; the jobs of a
dead group are retried split in two, because the cause may be the group's memory or one bad
job, and splitting isolates it. A job that loses its worker more than MAX_RETRIES times fails,
with the signal and the count in its message. A job retried alone trains in the one-job loop,
whose rounding differs slightly from the stacked engine's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from modelscape.sweep.jobs import Job


@dataclass
class Retries:
    """How often each job has lost its worker, and what to do with the jobs of a dead one."""

    max_retries: int
    deaths: dict[tuple, int] = field(default_factory=dict)

    def after_death(self, lost: Sequence[Job]) -> tuple[list[list[Job]], list[Job]]:
        """(groups to retry, jobs out of retries) for the unfinished jobs of a dead worker."""
        for job in lost:
            self.deaths[job.key] = self.deaths.get(job.key, 0) + 1
        again = [job for job in lost if self.deaths[job.key] <= self.max_retries]
        exhausted = [job for job in lost if self.deaths[job.key] > self.max_retries]
        return split_in_two(again), exhausted

    def count(self, job: Job) -> int:
        """How many times ``job`` has lost its worker."""
        return self.deaths.get(job.key, 0)


def split_in_two(group: Sequence[Job]) -> list[list[Job]]:
    """Two halves of a group (the first the larger); a single job stays one group."""
    if len(group) <= 1:
        return [list(group)] if group else []
    half = (len(group) + 1) // 2
    return [list(group[:half]), list(group[half:])]


def times(n: int) -> str:
    return "once" if n == 1 else "twice" if n == 2 else f"{n} times"


def exhausted_message(device: str, how: str, deaths: int, max_retries: int) -> str:
    """The error of a job that lost its worker more than MAX_RETRIES times."""
    return (
        f"the worker process on {device} died ({how}) while training this job, "
        f"{times(deaths)} (MAX_RETRIES={max_retries}): it was killed (out of memory?) or "
        "crashed. Raise MAX_RETRIES to retry more, or rerun with RETRY_FAILED=True to "
        "continue it from its checkpoint."
    )


def retry_notice(
    device: str, how: str, groups: Sequence[Sequence[Job]], attempt: int, max_retries: int
) -> str:
    """The line printed when the jobs of a dead worker are retried."""
    n_jobs = sum(len(g) for g in groups)
    return (
        f"the worker on {device} died ({how}); retrying its {n_jobs} unfinished "
        f"job(s) from their checkpoints in {len(groups)} group(s) (retry {attempt} of "
        f"MAX_RETRIES={max_retries})."
    )
