"""Analysis a referee would accept: censored times to threshold, summaries over trials with
honest intervals, power-law fits with bootstrap confidence intervals, TensorBoard export.

Every function takes a ``Result``, a run folder (``SAVE_DIR``) or ``Result.to_xarray()`` and
returns a labelled ``xarray.Dataset``; ``modelscape.results.plotting`` draws what they return.

- ``time_to_threshold``: Kaplan-Meier median steps to a loss, the fraction that reached it
  (``survival.py``);
- ``summarize``: median (bootstrap interval), geometric mean or mean +- s.e. over trials
  (``summary.py``);
- ``fit_power_law``: exponent and prefactor with bootstrap intervals, per ``hue``
  (``powerlaw.py``);
- ``export_tensorboard``: one TensorBoard run per job (``tensorboard.py``; the ``tensorboard``
  extra).

``docs/results.md`` explains the statistics.
"""

from modelscape.analysis._data import as_dataset, resolve_dim, resolve_variable
from modelscape.analysis.powerlaw import fit_power_law
from modelscape.analysis.summary import summarize
from modelscape.analysis.survival import time_to_threshold
from modelscape.analysis.tensorboard import export_tensorboard

__all__ = [
    "as_dataset",
    "export_tensorboard",
    "fit_power_law",
    "resolve_dim",
    "resolve_variable",
    "summarize",
    "time_to_threshold",
]
