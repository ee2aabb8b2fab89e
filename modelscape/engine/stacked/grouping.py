"""Which jobs may train together as one stacked model, and why a group may not.

Jobs that share their shapes (model, width, depth, sample count, dtype, optimizer class...) and
differ only in hyperparameters the schema marks ``varies_in_stack`` form a group
(``group_jobs``), capped by a memory budget (``group_cap``, from each job's footprint:
``footprint.job_bytes``). Jobs of the built-in MLP with MSE or cross-entropy loss may also
differ in N_SAMPLES (``across_sample_counts``): their stack lays the samples out ragged, without
padding (``stack.Layout``). Jobs whose models are built from other axis values never share a
stack (``model_arguments``). ``why_single`` decides, before anything trains, whether a group
trains stacked; its answer is what every record's ``trained_by`` says.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modelscape.engine.stacked.footprint import job_bytes, model_bytes
from modelscape.engine.stacked.optimizers import STACKED_OPTIMIZERS
from modelscape.errors import SweepError
from modelscape.models.builtin import MLP, resolve_model_class
from modelscape.results.records import TrainedBy
from modelscape.sweep import hparams as H
from modelscape.sweep.jobs import Job, hashable
from modelscape.sweep.spec import SweepSpec

GROUP_BYTES = 2 * 2**30  # default rough memory budget of one group's stacked tensors
MAX_GROUP = 256  # jobs per group at most, whatever the budget says

# every job-scoped hyperparameter not marked ``varies_in_stack`` in the schema is part of a
# group's shape
SAME_IN_GROUP = tuple(n for n in H.JOB_FIELDS if n not in H.VARIES_IN_STACK) + H.SWEEP_FIELDS

STACKED = TrainedBy("stacked")
SINGLE = TrainedBy("single")


def across_sample_counts(job: Job) -> bool:
    """Whether the job may share a stack with jobs of other N_SAMPLES: its model and loss take
    ``kernels.MLPKernel`` (the built-in MLP, MSE or cross-entropy loss), which stacks ragged
    samples. Decided from hyperparameters; a stack whose built models need ``FuncKernel``
    after all (a ``post_init_fn`` replaced the model, float targets under cross-entropy)
    trains one stack per sample count."""
    hp = job.hp
    losses = ("MSELoss", nn.MSELoss, "CrossEntropyLoss", nn.CrossEntropyLoss)
    return hp.MODEL_CLASS in (None, "MLP", MLP) and hp.LOSS in losses


def group_key(job: Job) -> tuple:
    """What must be equal for two jobs to share a stacked model: their shapes, and the axis
    values their model's constructor takes (``model_arguments``)."""
    ragged = across_sample_counts(job)
    return tuple(
        (n, hashable(getattr(job.hp, n)))
        for n in SAME_IN_GROUP
        if not (ragged and n == "N_SAMPLES")
    ) + model_arguments(job)


def model_arguments(job: Job) -> tuple:
    """The job's axis values that its model's constructor takes (an argument ``name`` comes
    from the key ``NAME``, ``builtin.constructor_kwargs``), e.g. a Transformer's HEADS or a
    user model's ``gamma``: a stack runs one copy of the model's code, so jobs whose models
    are built with other arguments train in other stacks."""
    taken = _constructor_arguments(job.hp.MODEL_CLASS)
    return tuple(
        (a, hashable(v))
        for a, v in job.values.items()
        if a in taken and a not in SAME_IN_GROUP  # those are in the key already
    )


@functools.lru_cache(maxsize=64)
def _constructor_arguments(model_class: Any) -> frozenset[str]:
    """The config keys (upper case) a model class's constructor reads by name."""
    try:
        cls = resolve_model_class(model_class)
        params = list(inspect.signature(cls.__init__).parameters)[1:]
    except Exception:  # noqa: BLE001 - a class that cannot be read fails its jobs at setup
        return frozenset()
    return frozenset(p.upper() for p in params)


def shape_key(job: Job) -> tuple:
    """What makes two jobs take the same memory: their group key and sample count."""
    return (group_key(job), job.hp.N_SAMPLES)


def group_cap(job: Job, group_bytes: int = GROUP_BYTES, *, spec: SweepSpec | None) -> int:
    """The most jobs ``group_jobs`` puts in this job's group (``MAX_GROUP``, ``group_bytes``).

    A function of the job's shape only (its hyperparameters, the sweep's sample shapes and
    what its model's constructor takes: ``footprint.job_bytes``), so the same in every run and
    for every job of a group. A job whose cap is 1 always trains alone, which lets its stack
    skip the pairing that keeps a one-job stack's numbers equal to those of a larger one
    (``kernels.bmm``).
    """
    return _cap(job_bytes(job, spec), group_bytes)


def _cap(size: int, group_bytes: int) -> int:
    return max(1, min(MAX_GROUP, group_bytes // max(1, size)))


def optimizer_refusal(job: Job) -> str | None:
    """Why the job's optimizer cannot be stacked, or None when it can."""
    opt = job.hp.OPTIMIZER
    cls = opt if isinstance(opt, type) else getattr(torch.optim, str(opt), None)
    if cls in STACKED_OPTIMIZERS:
        return None
    name = getattr(cls, "__name__", opt)
    known = ", ".join(c.__name__ for c in STACKED_OPTIMIZERS)
    return f"OPTIMIZER={name!r} has no stacked version ({known})"


def group_jobs(
    jobs: Sequence[Job], group_bytes: int = GROUP_BYTES, *, spec: SweepSpec | None
) -> list[list[Job]]:
    """Split jobs into groups that can train as one stacked model, in first-seen order.

    Jobs with the same ``group_key`` share a group, up to ``MAX_GROUP`` jobs and
    ``group_bytes`` of estimated memory (``footprint.job_bytes``; ``spec``: the sweep, whose
    sample shapes the preflight set); a job whose optimizer cannot be stacked stays alone
    (its record says why). With REFILL=True a group is not capped: it trains as a stream, as
    many jobs at once as the caps allow, a waiting job taking the rows of one that exited
    (``refill``).
    """
    budget = device_budget(jobs[0]) if jobs and group_bytes == GROUP_BYTES else group_bytes
    buckets: dict[tuple, list[list[Job]]] = {}
    used: dict[int, int] = {}  # bytes of each open group
    order: list[list[Job]] = []
    for job in jobs:
        size = job_bytes(job, spec)
        if optimizer_refusal(job) is not None or _cap(size, group_bytes) == 1:
            order.append([job])  # a job whose cap is 1 always trains alone (kernels.bmm)
            continue
        groups = buckets.setdefault(group_key(job), [])
        full = groups and (len(groups[-1]) >= MAX_GROUP or used[id(groups[-1])] + size > budget)
        if not groups or (full and not job.hp.REFILL):
            groups.append([])
            order.append(groups[-1])
            used[id(groups[-1])] = 0
        groups[-1].append(job)
        used[id(groups[-1])] += size
    return order


def device_budget(job: Job) -> int:
    """The memory budget of a group: ``GROUP_BYTES``, or on CUDA devices the smallest one's
    memory (a stack is trained in chunks that fit its free memory, ``memory.chunks``)."""
    cuda = [d for d in job.hp.DEVICES if d != "cpu"]
    if not cuda or not torch.cuda.is_available():
        return GROUP_BYTES
    count = torch.cuda.device_count()
    sizes = [torch.cuda.get_device_properties(d).total_memory for d in cuda if d < count]
    return max(GROUP_BYTES, min(sizes, default=GROUP_BYTES))


def why_single(
    jobs: Sequence[Job], device: torch.device | None = None, spec: SweepSpec | None = None
) -> TrainedBy | None:
    """None when this group trains stacked; else its records' ``trained_by``.

    ``"single"``: a lone job or BATCHED="off"; ``"single: <reason>"``: the jobs could have
    shared a stack but these cannot (decided from the jobs alone; what only the built models
    reveal is decided in ``run.train_stacked``). BATCHED="on" makes a reason an error.
    Given the ``device`` and ``spec``, a group that could stack but gains nothing from it there
    (``SLOWER_STACKED``: convolutions on the CPU) trains one job at a time under
    BATCHED="auto", saying why.
    """
    if jobs[0].hp.BATCHED == "off":
        return SINGLE
    reason = optimizer_refusal(jobs[0])
    if reason is None:
        key = group_key(jobs[0])
        for job in jobs[1:]:
            other = group_key(job)
            if other != key:
                names = [a[0] for a, b in zip(key, other) if a != b]
                reason = f"jobs differ in {', '.join(names)}"
                break
    if reason is None:
        # a job alone trains in the one-job loop: stacking one job would cost it a second copy
        if len(jobs) < 2:
            return SINGLE
        return _slower_stacked(jobs[0], device, spec)
    return refuse(jobs[0], reason)


# Measured with benchmarks/bench_models.py (benchmarks/NOTES.md, 2026-12-08): on the CPU a
# stack's convolutions run as one grouped convolution, which oneDNN computes 1.5-3x slower than
# the jobs' own, and its activations no longer fit the cache. Over three runs the stacked
# ResNet averaged 0.94x a plain loop against 1.01x one job at a time, the CNN 1.01x against
# 0.98x: no faster stacked, for 16 times the activation memory.
SLOWER_STACKED = TrainedBy(
    "single: stacked convolutions are no faster on the CPU (BATCHED='on' stacks them)"
)


def _slower_stacked(
    job: Job, device: torch.device | None, spec: SweepSpec | None
) -> TrainedBy | None:
    if job.hp.BATCHED != "auto" or device is None or device.type != "cpu" or spec is None:
        return None
    counted = model_bytes(job, spec)
    return SLOWER_STACKED if counted is not None and counted.convolutional else None


def refuse(job: Job, reason: str) -> TrainedBy:
    """The ``trained_by`` of jobs that cannot train stacked; an error with BATCHED="on"."""
    if job.hp.BATCHED == "on":
        raise SweepError(
            f"BATCHED='on' but these jobs cannot train as one stacked model: {reason}. "
            "Use BATCHED='auto' to train them one at a time."
        )
    return TrainedBy("single", reason)


def can_batch(jobs: Sequence[Job]) -> bool:
    """True when this group trains as one stacked model (see ``why_single``)."""
    return why_single(jobs) is None
