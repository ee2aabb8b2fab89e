"""Every failure modelscape raises on purpose: one hierarchy, rooted at ``ModelscapeError``.

Each message names the fix. Bad input raises before any job trains; a job that fails while
training becomes a failed ``JobRecord`` (its error and traceback kept), not an exception.

- ``HParamError``: a hyperparameter has a bad name, type or value.
- ``SweepError``: the sweep's definition is bad (axes, iterators, functions, data).
  - ``StoreError``: the run folder (SAVE_DIR) cannot be used for this sweep.
  - ``ExecutorError``: the executor cannot run the sweep (workers die at startup, Ray missing).
- ``ParametrizationError``: a parametrization cannot be applied to a model.
- ``WorkerDied``: a worker process ended while training a job (kept in that job's record).
"""

from __future__ import annotations


class ModelscapeError(Exception):
    """The base of every error modelscape raises on purpose."""


class HParamError(ModelscapeError, ValueError):
    """A hyperparameter has a bad name, type or value. The message says how to fix it."""


class SweepError(ModelscapeError, ValueError):
    """The sweep's definition is bad (axes, iterators, functions). The message names the fix."""


class StoreError(SweepError):
    """A run folder (SAVE_DIR) holds another sweep, another format, or is being written."""


class ExecutorError(SweepError):
    """The executor cannot run the sweep: its workers cannot start, or its backend is missing."""


class ParametrizationError(ModelscapeError, ValueError):
    """A parametrization cannot be applied to this model or optimizer; the message says why."""


class WorkerDied(ModelscapeError, RuntimeError):
    """A worker process ended (killed, out of memory, crashed) while training a job."""
