"""Every failure modelscape raises on purpose: one hierarchy, rooted at ``ModelscapeError``.

Each message names the fix. Bad input raises before any job trains; a job that fails while
training becomes a failed ``JobRecord`` (its error and traceback kept), not an exception.

- ``HParamError``: a hyperparameter has a bad name, type or value.
- ``SweepError``: the sweep's definition is bad (axes, iterators, functions, data).
  - ``StoreError``: the run folder (SAVE_DIR) cannot be used for this sweep.
    - ``RunFolderMismatch``: it holds a sweep with other axes or settings.
  - ``ExecutorError``: the executor cannot run the sweep (workers die at startup, Ray missing).
- ``ParametrizationError``: a parametrization cannot be applied to a model.
- ``WorkerDied``: a worker process ended while training a job (kept in that job's record).
- ``MissingExtra``: an optional package is missing; ``require_extra`` names the extra to install.
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


class RunFolderMismatch(StoreError):
    """A run folder (SAVE_DIR) holds a sweep with other axes or other settings than this one."""


class ExecutorError(SweepError):
    """The executor cannot run the sweep: its workers cannot start, or its backend is missing."""


class ParametrizationError(ModelscapeError, ValueError):
    """A parametrization cannot be applied to this model or optimizer; the message says why."""


class WorkerDied(ModelscapeError, RuntimeError):
    """A worker process ended (killed, out of memory, crashed) while training a job."""


class MissingExtra(ModelscapeError, ImportError):
    """An optional package is not installed; the message names the extra that brings it."""


def require_extra(module: str, extra: str, purpose: str) -> None:
    """Raise ``MissingExtra`` unless ``module`` can be imported; ``purpose`` says what needs it."""
    import importlib.util

    from modelscape._version import DISTRIBUTION

    if importlib.util.find_spec(module) is None:
        raise MissingExtra(
            f"{purpose} needs {module}, which is not installed: pip install "
            f"'{DISTRIBUTION}[{extra}]' (in a clone: pip install -e '.[{extra}]')."
        )
