"""How many jobs of a group a device holds at once.

On CUDA a group trains in chunks that fit the device's free memory (``torch.cuda.mem_get_info``),
at the per-job footprint measured while earlier jobs of the same shapes trained (``Footprint``;
until then, ``footprint.job_bytes``'s estimate). An out-of-memory error splits a stack in two
(``run.train_stacked``); a job's numbers do not depend on its stack, so the split changes
nothing but memory. Elsewhere a group trains whole.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

import torch

from modelscape.engine.stacked.footprint import job_bytes
from modelscape.engine.stacked.grouping import shape_key
from modelscape.sweep.jobs import Job
from modelscape.sweep.spec import SweepSpec

HEADROOM = 0.85  # share of the free memory a chunk may take (the allocator fragments)
_MEASURED: dict[tuple, float] = {}  # shape_key -> bytes per job, measured on this process


def per_job(job: Job, spec: SweepSpec) -> float:
    """Bytes one job of this shape takes on a CUDA device: measured, or estimated."""
    measured = _MEASURED.get(shape_key(job))
    return float(job_bytes(job, spec)) if measured is None else measured


def chunks(jobs: Sequence[Job], device: torch.device, spec: SweepSpec) -> list[list[Job]]:
    """The group in consecutive chunks that fit the device's free memory (CUDA only)."""
    if device.type != "cuda" or len(jobs) < 2:
        return [list(jobs)]
    free, _ = torch.cuda.mem_get_info(device)
    out: list[list[Job]] = [[]]
    used = 0.0
    for job in jobs:
        need = per_job(job, spec)
        if out[-1] and used + need > HEADROOM * free:
            out.append([])
            used = 0.0
        out[-1].append(job)
        used += need
    return out


def release(device: torch.device) -> None:
    """Return the memory of a failed stack to the device before its halves train."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Footprint:
    """Measures the peak memory of training ``jobs`` on a CUDA device, per job (a no-op
    elsewhere); ``chunks`` then sizes later groups of the same shapes from it."""

    def __init__(self, jobs: Sequence[Job], device: torch.device):
        self.jobs, self.device = list(jobs), device
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Footprint:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, kind, err, tb) -> None:
        if self.cuda and kind is None:
            peak = torch.cuda.max_memory_allocated(self.device) - self.base
            for job in self.jobs:
                _MEASURED[shape_key(job)] = peak / len(self.jobs)
