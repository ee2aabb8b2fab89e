"""The one-job training loop: the reference every other engine must reproduce.

Each step draws the batch, takes the forward pass, the loss, the backward pass and the
optimizer step. The losses stay tensors for a window of ``SYNC_EVERY`` steps (shorter when an
evaluation or a checkpoint is due), then ``tracking`` applies the loop rules (EMA, timekeys, exits,
curves) to the whole window at once. A job that exited inside the window is rewound to the
window's start (parameters, buffers, optimizer, data generator, global RNG) and rerun up to its
exit step, so the record is the one a step-by-step loop would give, bit for bit.
``run_job`` wraps setup and training so that a failing job becomes a failed record.
"""

from __future__ import annotations

import contextlib

import torch

from modelscape.engine import precision
from modelscape.engine.failures import failure_boundary
from modelscape.engine.setup import Problem, seeded_global_rng, setup_job, training_rng_seed
from modelscape.engine.state import (
    job_state_dict,
    load_checkpoint,
    load_training_state_dict,
    training_state_dict,
)
from modelscape.engine.stateful import own_dropout, stream_dropouts
from modelscape.engine.tracking import SYNC_EVERY, Tracker, evaluate
from modelscape.results.records import JobRecord
from modelscape.store.checkpoints import Checkpoints
from modelscape.sweep.jobs import Job, SubSeeds
from modelscape.sweep.spec import SweepSpec


def train(
    problem: Problem, checkpoints: Checkpoints | None = None, trained_by: str = "single"
) -> JobRecord:
    """Run the training loop of one job to its thresholds or MAX_ITER.

    With ``checkpoints``, the job's state is saved every CHECKPOINT_EVERY seconds, and a job
    with a saved state continues from it: the result is bit-identical (on CPU) to a run that
    was never interrupted, provided the batch function depends only on ``gen`` and ``step``.
    ``trained_by`` goes into the record (why this job did not train in a stack).
    """
    # The global RNGs (dropout, user code) are seeded per job, so they do not depend on placement.
    seed = training_rng_seed(problem.job)
    with seeded_global_rng(seed, problem.device), precision.matmuls(problem.job.hp.PRECISION):
        return _loop(problem, checkpoints, trained_by)


def _loop(problem: Problem, checkpoints: Checkpoints | None, trained_by: str) -> JobRecord:
    hp = problem.job.hp
    track, _ = load_checkpoint(problem, checkpoints)
    if checkpoints is not None:
        checkpoints.reset_clock()
    tracker = Tracker([track])
    autocast = None
    if precision.compute_dtype(hp.PRECISION) is not None:
        autocast = precision.autocast(hp.PRECISION, problem.device)
    problem.model.train()
    seed = SubSeeds.of(problem.job.seed).dropout  # the job's Dropout masks (``stateful``)
    X = y = None
    t = track.step + 1
    while t < hp.MAX_ITER:
        # One window: losses stay tensors and the loop rules run once on all of them (one host
        # sync); a job that exited inside it is rewound to the window's start and rerun.
        start = training_state_dict(problem, copy=True)
        dropout = (seed, stream_dropouts(problem.model))  # a grab may have changed them
        losses = []
        for step in range(t, min(t + SYNC_EVERY, hp.MAX_ITER)):
            X, y, loss = _step(problem, step, autocast, dropout)
            losses.append(loss.detach())
            # an evaluation or a checkpoint needs the state after exactly this step
            if track.eval_due(step) or (checkpoints is not None and checkpoints.due()):
                break
        tracker.consume(t, torch.stack(losses).to(torch.float64)[None], (0,))
        if track.exit is not None and track.exit < step:
            load_training_state_dict(problem, start)
            for step in range(t, track.exit + 1):
                X, y, _ = _step(problem, step, autocast, dropout)
        if track.eval_due(step):
            track.curves.add_eval(step, evaluate(problem, X, y, step))
        if track.exit is not None:
            break
        if checkpoints is not None and checkpoints.due():
            checkpoints.save(
                problem.job.key, job_state_dict(problem, track, tracker.seconds(track))
            )
        t = step + 1
    return tracker.finish(track, problem, (X, y), trained_by)


def _step(
    problem: Problem, step: int, autocast, dropout: tuple[int, list]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training step: the batch of ``step`` and its loss (before the update). ``dropout``:
    the job's mask stream and its Dropout modules, which take their masks from it at
    ``step``; ``autocast``: the forward pass's context under bf16-mixed, else None."""
    problem.step = step  # a failure is recorded with the step it happened at
    X, y, f0 = problem.batch(step)
    seed, modules = dropout
    if autocast is None and not modules:  # no context to enter: a plain loop's step
        loss = problem.loss_fn(problem.output(X, f0), y)
    else:
        with autocast or contextlib.nullcontext(), own_dropout(problem.model, seed, step, modules):
            loss = problem.loss_fn(problem.output(X, f0), y)
    problem.opt.zero_grad(set_to_none=True)
    loss.backward()
    problem.opt.step()
    return X, y, loss


def run_job(
    job: Job,
    spec: SweepSpec,
    device: torch.device,
    checkpoints: Checkpoints | None = None,
    trained_by: str = "single",
) -> JobRecord:
    """Set up and train one job; an exception becomes a failed record, and so does an exit
    (``SystemExit``, ``KeyboardInterrupt``) raised in user code, but not the terminal's Ctrl-C."""
    problem = None

    def step() -> int | None:
        return None if problem is None else problem.step

    with failure_boundary(job, device, trained_by, step) as failed:
        problem = setup_job(job, spec, device)
        return train(problem, checkpoints, trained_by)
    return failed.record
