"""A job's record, ``JobRecord``, and the schema of its fields: the one place a field is defined.

Each field of ``JobRecord`` carries its storage in its metadata (``column(...)``):

- ``sql``: the SQLite column definition in a run folder's ``records`` table, or None for what is
  stored elsewhere (the key lives in the ``jobs`` table; timekeys, grabs and curves in one
  ``.npz`` blob);
- ``per_job``: a per-job scalar, so a column of ``Result.to_dataframe()`` and a variable (one
  value per grid point) of ``Result.to_xarray()``.

The store's columns, its row packing and unpacking (old run folders gain new columns when a
sweep resumes them), ``Result``, ``to_dataframe`` and ``to_xarray`` are all read from here, so
a new per-job field is one new line in ``JobRecord``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from modelscape.sweep.jobs import hashable  # noqa: F401 - its old home; the shim re-exports it

Status = Literal["ok", "diverged", "failed"]


class TrainedBy(str):
    """How a job trained: ``TrainedBy("stacked")``, ``TrainedBy("single")`` (a lone job, or
    BATCHED="off"), or ``TrainedBy("single", reason)`` when its jobs could not share a stack.

    It is the text ``"single: <reason>"`` wherever text goes (the run folder, tables, counts),
    and its parts are ``engine`` and ``reason``; a stored value reads back with ``of``.
    """

    __slots__ = ()

    def __new__(cls, engine: Literal["stacked", "single"], reason: str | None = None):
        return super().__new__(cls, engine if not reason else f"{engine}: {reason}")

    @classmethod
    def of(cls, text: str) -> TrainedBy:
        """The value a record's ``trained_by`` text stands for."""
        engine, _, reason = str(text).partition(": ")
        return cls(engine, reason or None)  # type: ignore[arg-type]

    @property
    def engine(self) -> str:
        return self.partition(": ")[0]

    @property
    def reason(self) -> str | None:
        return self.partition(": ")[2] or None


def column(
    default: Any = dataclasses.MISSING,
    *,
    sql: str | None,
    per_job: bool = False,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A ``JobRecord`` field with its storage: see the module docstring."""
    metadata = {"sql": sql, "per_job": per_job}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class JobRecord:
    """What one job produced. A failure keeps its message and traceback.

    ``train_loss`` is the EMA train loss at exit; ``test_loss`` the test loss of the final
    parameters; ``timekeys[j]`` the first step whose EMA is below threshold ``j`` (NaN when never
    reached). With ONLYTHRESHOLDS=False, ``curves`` holds ``train_loss``, ``test_loss`` and each
    grab, each of length MAX_ITER (padded after exit with the last value). ``trained_by`` says
    how the job trained: ``"stacked"`` (with others of its group), ``"single"``, or
    ``"single: <reason>"`` when a stack could not be used. ``joined_at``: for a job that
    joined a running stack (REFILL), the steps that stack had taken when it joined (None
    for a job that started with its stack, or trained alone).
    """

    key: tuple = column(sql=None)
    seed: int = column(sql="INTEGER NOT NULL", per_job=True)
    status: Status = column(sql="TEXT NOT NULL", per_job=True)
    train_loss: float = column(float("nan"), sql="REAL", per_job=True)
    test_loss: float = column(float("nan"), sql="REAL", per_job=True)
    timekeys: np.ndarray = column(sql=None, factory=lambda: np.zeros(0))
    grabs: dict[str, np.ndarray] = column(sql=None, factory=dict)
    curves: dict[str, np.ndarray] | None = column(None, sql=None)
    steps: int = column(0, sql="INTEGER NOT NULL", per_job=True)
    seconds: float = column(0.0, sql="REAL NOT NULL", per_job=True)
    device: str = column("cpu", sql="TEXT NOT NULL")
    error: str | None = column(None, sql="TEXT", per_job=True)
    traceback: str | None = column(None, sql="TEXT")
    trained_by: str = column("", sql="TEXT NOT NULL DEFAULT ''", per_job=True)
    joined_at: int | None = column(None, sql="INTEGER", per_job=True)


FIELDS = {f.name: f for f in dataclasses.fields(JobRecord)}
#: name -> SQLite column definition, for the fields stored as columns of their own.
SQL_COLUMNS = {name: f.metadata["sql"] for name, f in FIELDS.items() if f.metadata["sql"]}
#: The per-job scalars, in field order.
PER_JOB = tuple(name for name, f in FIELDS.items() if f.metadata["per_job"])


def default_of(name: str) -> Any:
    """The value a field has when a record does not set it (or an old store lacks its column)."""
    f = FIELDS[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default
