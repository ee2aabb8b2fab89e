"""The one-job training loop: the reference every other engine must reproduce.

Each step draws the batch, takes the forward pass, the loss, the backward pass and the
optimizer step, then hands the loss to ``tracking`` (the loop rules: EMA, timekeys, exits,
curves). ``run_job`` wraps setup and training so that a failing job becomes a failed record.
"""

from __future__ import annotations

import torch

from modelscape.engine import precision
from modelscape.engine.setup import Problem, setup_job, training_rng_seed
from modelscape.engine.state import Checkpoints, restore, snapshot
from modelscape.engine.tracking import Tracker, evaluate, failed_record
from modelscape.jobs import Job
from modelscape.results import JobRecord
from modelscape.sweep import SweepSpec


def train(
    problem: Problem, checkpoints: Checkpoints | None = None, trained_by: str = "single"
) -> JobRecord:
    """Run the training loop of one job to its thresholds or MAX_ITER.

    With ``checkpoints``, the job's state is saved every CHECKPOINT_EVERY seconds, and a job
    with a saved state continues from it: the result is bit-identical (on CPU) to a run that
    was never interrupted, provided the batch function depends only on ``gen`` and ``step``.
    ``trained_by`` goes into the record (why this job did not train in a stack).
    """
    devices = [problem.device] if problem.device.type == "cuda" else []
    # The global RNG (dropout, user code) is seeded per job, so it does not depend on placement.
    with torch.random.fork_rng(devices=devices), precision.matmuls(problem.job.hp.PRECISION):
        torch.manual_seed(training_rng_seed(problem.job))
        return _loop(problem, checkpoints, trained_by)


def _loop(problem: Problem, checkpoints: Checkpoints | None, trained_by: str) -> JobRecord:
    hp = problem.job.hp
    track, _ = restore(problem, checkpoints)
    if checkpoints is not None:
        checkpoints.reset_clock()
    tracker = Tracker([track])
    model, opt, loss_fn = problem.model, problem.opt, problem.loss_fn
    X = y = None
    autocast = precision.autocast(hp.PRECISION, problem.device)
    model.train()
    for step in range(track.step + 1, hp.MAX_ITER):
        X, y, f0 = problem.batch(step)
        with autocast:
            loss = loss_fn(problem.output(X, f0), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # the one-job loop syncs every step; the stacked engine once per window
        tracker.consume(step, [[loss.item()]], (0,))
        if track.eval_due(step):
            track.curves.add_eval(step, evaluate(problem, X, y, step))
        if track.exit is not None:
            break
        if checkpoints is not None and checkpoints.due():
            checkpoints.save(problem.job.key, snapshot(problem, track, tracker.seconds(track)))
    return tracker.finish(track, problem, (X, y), trained_by)


def run_job(
    job: Job,
    spec: SweepSpec,
    device: torch.device,
    checkpoints: Checkpoints | None = None,
    trained_by: str = "single",
) -> JobRecord:
    """Set up and train one job; an exception becomes a failed record."""
    try:
        return train(setup_job(job, spec, device), checkpoints, trained_by)
    except Exception as err:  # noqa: BLE001 - isolation: one job never sinks the sweep
        return failed_record(job, err, device, trained_by)
