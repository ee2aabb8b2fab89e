"""How jobs are trained: one job at a time, or a group as one stacked model.

- ``setup``: a ``Job`` becomes a ``Problem`` (data, model, optimizer, loss).
- ``tracking``: the loop rules (EMA, timekeys, exits, divergence, curves, VERBOSE, the record),
  once for every engine, vectorized over the jobs of a window.
- ``precision``: PRECISION (fp32, tf32, bf16-mixed), for every engine.
- ``loop``: the one-job training loop, the reference.
- ``stacked``: compatible jobs as one model with a leading job dimension (``grouping``,
  ``footprint``, ``stack``, ``kernels``, ``optimizers``, ``run``, ``memory``, ``graphs``).
- ``state``: what a job's checkpoint holds, shared by both engines (the files are the run
  folder's: ``store/checkpoints.py``).
- ``failures``: the failure boundary: an exception fails its job (a failed record), a Ctrl-C
  from the terminal stops the sweep.
- ``group``: ``train_group``, what executors call; every record's ``trained_by`` says how the
  job trained.
"""

from modelscape.engine.failures import failed_record, failure_boundary
from modelscape.engine.group import deterministic_algorithms, train_group
from modelscape.engine.loop import run_job, train
from modelscape.engine.optimizer import optimizer_kwargs
from modelscape.engine.setup import (
    Problem,
    evaluate_grabs,
    job_config,
    kept_global_rngs,
    model_spec,
    resolve_class,
    resolve_device,
    setup_job,
    to_device,
    training_rng_seed,
)
from modelscape.engine.stacked.footprint import job_bytes
from modelscape.engine.stacked.grouping import (
    GROUP_BYTES,
    MAX_GROUP,
    can_batch,
    group_cap,
    group_jobs,
    why_single,
)
from modelscape.engine.stacked.optimizers import STACKED_OPTIMIZERS, StackedOptimizer, register
from modelscape.engine.stacked.refill import train_stacked
from modelscape.engine.tracking import SYNC_EVERY, Curves, Track, Tracker
from modelscape.sweep.code_identity import NUMERICS_VERSION  # raise it there (see its comment)

__all__ = [
    "GROUP_BYTES",
    "MAX_GROUP",
    "NUMERICS_VERSION",
    "STACKED_OPTIMIZERS",
    "SYNC_EVERY",
    "Curves",
    "Problem",
    "StackedOptimizer",
    "Track",
    "Tracker",
    "can_batch",
    "deterministic_algorithms",
    "evaluate_grabs",
    "failed_record",
    "failure_boundary",
    "group_cap",
    "group_jobs",
    "job_bytes",
    "job_config",
    "model_spec",
    "optimizer_kwargs",
    "register",
    "resolve_class",
    "resolve_device",
    "run_job",
    "kept_global_rngs",
    "setup_job",
    "to_device",
    "train",
    "train_group",
    "train_stacked",
    "training_rng_seed",
    "why_single",
]
