"""Moved to ``modelscape.results.plotting``.

This path keeps old imports, pickled results and stored files working."""

from modelscape.results.plotting import (
    AXIS_ALIASES,
    TRIAL_AXIS,
    as_dataset,
    learning_curve,
    loglog_fit,
    loss_vs_step,
    resolve_dim,
    resolve_variable,
    save,
    time_to_threshold,
)

__all__ = [
    "AXIS_ALIASES",
    "TRIAL_AXIS",
    "as_dataset",
    "resolve_dim",
    "resolve_variable",
    "learning_curve",
    "time_to_threshold",
    "loss_vs_step",
    "loglog_fit",
    "save",
]
