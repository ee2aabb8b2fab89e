"""Moved to ``modelscape.sweep.jobs``.

This path keeps old imports, pickled results and stored files working."""

from modelscape.sweep.jobs import (
    AXIS_ALIASES,
    OPTIMIZER_ARG_AXIS,
    TRIAL_AXIS,
    Job,
    SubSeeds,
    axis_target,
    build_jobs,
    check_distinct,
    job_fingerprint,
    job_seed,
    materialize,
    stable_repr,
    sub_seeds,
)

__all__ = [
    "AXIS_ALIASES",
    "TRIAL_AXIS",
    "OPTIMIZER_ARG_AXIS",
    "Job",
    "axis_target",
    "stable_repr",
    "job_seed",
    "SubSeeds",
    "sub_seeds",
    "materialize",
    "check_distinct",
    "build_jobs",
    "job_fingerprint",
]
