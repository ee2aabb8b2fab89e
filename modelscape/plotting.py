"""Moved to ``modelscape.results.plotting``.

This path keeps old imports, pickled results and stored files working."""

from modelscape.results.plotting import (
    TRIAL_AXIS,
    as_dataset,
    draw_fit,
    learning_curve,
    loglog_fit,
    loss_vs_step,
    power_law_fit,
    resolve_dim,
    resolve_variable,
    save,
    time_to_threshold,
)
from modelscape.sweep.jobs import AXIS_ALIASES

__all__ = [
    "AXIS_ALIASES",
    "TRIAL_AXIS",
    "as_dataset",
    "draw_fit",
    "learning_curve",
    "loglog_fit",
    "loss_vs_step",
    "power_law_fit",
    "resolve_dim",
    "resolve_variable",
    "save",
    "time_to_threshold",
]
