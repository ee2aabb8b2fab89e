"""Where jobs run: the registry of executors, by the names EXECUTOR accepts.

An executor trains groups of jobs somewhere and hands each record back to this process:

- ``local`` (``LocalExecutor``, ``local.py``): WORKERS_PER_DEVICE worker processes per entry of
  DEVICES; with one worker in total, ``InProcessExecutor`` (``inprocess.py``) trains in this
  process instead;
- ``ray`` (``RayExecutor``, ``ray.py``): each group is a Ray task.

The shared work (pickling, failed records, streaming records) lives in ``base.py``. Adding a
backend is a new module with an ``Executor`` subclass plus one line in ``REGISTRY``. This module
imports no backend (and nothing of modelscape): ``hparams`` reads the names from here, and a
backend's module is imported only when it is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

#: EXECUTOR name -> "module:Class" of its executor.
REGISTRY = {
    "local": "modelscape.execution.local:LocalExecutor",
    "ray": "modelscape.execution.ray:RayExecutor",
}
EXECUTORS = tuple(REGISTRY)

# Public classes importable from this package, loaded on first use so that importing the
# registry stays free of torch and of the backends.
_LAZY = {
    "Executor": "modelscape.execution.base:Executor",
    "InProcessExecutor": "modelscape.execution.inprocess:InProcessExecutor",
    "LocalExecutor": REGISTRY["local"],
    "RayExecutor": REGISTRY["ray"],
    "executor_for": "modelscape.execution.base:executor_for",
}


def _load(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def executor_class(name: str) -> type:
    """The executor class registered under ``name`` (an EXECUTOR value)."""
    if name not in REGISTRY:
        raise KeyError(f"no executor {name!r}; choose one of {', '.join(REGISTRY)}.")
    return _load(REGISTRY[name])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return _load(_LAZY[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EXECUTORS", "REGISTRY", "executor_class", *_LAZY]
