"""``RunStore``, the run folder of a sweep (SAVE_DIR), and ``load``, which reads one back.

A run folder holds:

- ``config.json``: the resolved sweep description (see ``describe.py``), readable by eye;
- ``results.sqlite``: the job list and one row per finished job, each written in its own
  transaction as the job completes. The ``records`` table has one column per stored field of
  ``JobRecord`` (from the record schema in ``modelscape.records``): scalars are SQLite REALs
  (IEEE doubles, so lossless; NaN is stored as NULL) and INTEGERs, text is TEXT; arrays
  (timekeys, grabs, curves) are one ``.npz`` blob;
- ``checkpoints/``: the last checkpoint of each running job.

SQLite runs in WAL mode: a SIGKILL at any moment loses at most the jobs that were in flight,
and ``load(run_dir)`` reads a consistent snapshot even while a sweep is still writing. A folder
written before a field existed gains its column when a sweep resumes it; ``load`` reads it as
it is, giving the missing field its default.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelscape.errors import StoreError
from modelscape.jobs import Job
from modelscape.records import SQL_COLUMNS, JobRecord, default_of
from modelscape.results import Result
from modelscape.store.base import Store, key_id
from modelscape.store.describe import FORMAT_VERSION, check_compatible, union_values

DB_NAME = "results.sqlite"
CONFIG_NAME = "config.json"
CHECKPOINT_DIR = "checkpoints"

# the record's own columns, then how its arrays are kept and when it was written
_STORAGE_COLUMNS = {
    "array_names": "TEXT NOT NULL",
    "arrays": "BLOB NOT NULL",
    "has_curves": "INTEGER NOT NULL",
    "finished_at": "REAL NOT NULL",
}
_COLUMNS = {**SQL_COLUMNS, **_STORAGE_COLUMNS}

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    idx INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id TEXT UNIQUE NOT NULL,
    key BLOB NOT NULL,
    seed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    key_id TEXT PRIMARY KEY REFERENCES jobs(key_id),
    {", ".join(f"{name} {sql}" for name, sql in _COLUMNS.items())}
);
"""


def _connect(path: Path) -> sqlite3.Connection:
    # timeout: a reader may briefly hold the lock while the writer commits
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def _existing_columns(conn: sqlite3.Connection) -> set[str]:
    return {row[1] for row in conn.execute("PRAGMA table_info(records)")}


class RunStore(Store):
    """The SQLite store of a run folder. The sweep's parent process is its only writer."""

    def __init__(
        self, run_dir: str | os.PathLike, conn: sqlite3.Connection, lock: _FolderLock | None
    ):
        self.run_dir = Path(run_dir)
        self._conn = conn
        self._lock = lock
        self._have = _existing_columns(conn)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    @classmethod
    def open(
        cls,
        run_dir: str | os.PathLike,
        description: Mapping[str, Any],
        jobs: Sequence[Job],
        axis_values: Sequence[Sequence[Any]],
    ) -> RunStore:
        """Create the run folder, or resume it if it holds a compatible sweep.

        ``description`` is ``describe_sweep``'s output. A stored sweep with other axes or other
        shared job hyperparameters raises ``StoreError`` saying what differs. New iterator
        values extend the stored sweep.
        """
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = _FolderLock(run_dir)
        conn = _connect(run_dir / DB_NAME)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL is durable against a killed process in WAL mode; FULL only adds
            # protection against power loss, at an fsync per job.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SCHEMA)
            _add_missing_columns(conn)
            store = cls(run_dir, conn, lock)
            store._register(description, jobs, axis_values)
        except BaseException:
            conn.close()
            lock.close()
            raise
        return store

    def _meta(self, name: str) -> Any:
        row = self._conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else row[0]

    def _register(
        self,
        description: Mapping[str, Any],
        jobs: Sequence[Job],
        axis_values: Sequence[Sequence[Any]],
    ) -> None:
        stored = self._meta("description")
        if stored is not None:
            check_compatible(self.run_dir, json.loads(stored), description)
            old_values = pickle.loads(self._meta("axis_values"))
            axis_values = [union_values(old, new) for old, new in zip(old_values, axis_values)]
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?)", (str(FORMAT_VERSION),))
            c.execute(
                "INSERT OR REPLACE INTO meta VALUES ('description', ?)",
                (json.dumps(description, sort_keys=True),),
            )
            c.execute(
                "INSERT OR REPLACE INTO meta VALUES ('axis_values', ?)",
                (pickle.dumps([list(v) for v in axis_values]),),
            )
            c.executemany(
                "INSERT OR IGNORE INTO jobs (key_id, key, seed) VALUES (?, ?, ?)",
                [(key_id(j.key), pickle.dumps(j.key), j.seed) for j in jobs],
            )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        _write_json(self.run_dir / CONFIG_NAME, description)

    def add(self, record: JobRecord) -> None:
        row = {"key_id": key_id(record.key), **_pack(record)}
        names = ", ".join(row)
        marks = ", ".join("?" * len(row))
        # one statement in autocommit mode: its own atomic transaction
        self._conn.execute(
            f"INSERT OR REPLACE INTO records ({names}) VALUES ({marks})", tuple(row.values())
        )

    def get(self, key: tuple) -> JobRecord | None:
        row = self._conn.execute(
            f"SELECT {_select_list(self._have)} FROM records r JOIN jobs j USING (key_id) "
            "WHERE key_id = ?",
            (key_id(key),),
        ).fetchone()
        return None if row is None else _unpack(self._have, row)

    def statuses(self) -> dict[str, str]:
        return dict(self._conn.execute("SELECT key_id, status FROM records"))

    def close(self) -> None:
        self._conn.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Give a run folder from an earlier version the columns of fields added since."""
    have = _existing_columns(conn)
    for name, sql in _COLUMNS.items():
        if name not in have:
            conn.execute(f"ALTER TABLE records ADD COLUMN {name} {sql}")


def _encode(sql: str, value: Any) -> Any:
    kind = sql.split()[0]
    if kind == "REAL":
        value = float(value)
        return None if np.isnan(value) else value
    if kind == "INTEGER":
        return int(value)
    return value


def _decode(sql: str, value: Any) -> Any:
    kind = sql.split()[0]
    if kind == "REAL":
        return float("nan") if value is None else float(value)
    if kind == "INTEGER":
        return int(value)
    return value


def _pack(record: JobRecord) -> dict[str, Any]:
    row = {name: _encode(sql, getattr(record, name)) for name, sql in SQL_COLUMNS.items()}
    names: list[list[str]] = [["timekeys", ""]]
    arrays = [np.asarray(record.timekeys)]
    for name, value in record.grabs.items():
        names.append(["grab", name])
        arrays.append(np.asarray(value))
    for name, value in (record.curves or {}).items():
        names.append(["curve", name])
        arrays.append(np.asarray(value))
    buf = io.BytesIO()
    np.savez(buf, *arrays)
    row.update(
        array_names=json.dumps(names),
        arrays=buf.getvalue(),
        has_curves=int(record.curves is not None),
        finished_at=time.time(),
    )
    return row


def _stored(have: set[str]) -> list[str]:
    """The record's fields that this run folder has columns for."""
    return [name for name in SQL_COLUMNS if name in have]


def _select_list(have: set[str]) -> str:
    stored = (f"r.{n}" for n in _stored(have))
    return ", ".join(["j.key", *stored, "r.array_names", "r.arrays", "r.has_curves"])


def _unpack(have: set[str], row: Sequence[Any]) -> JobRecord:
    key, *values, names, blob, has_curves = row
    fields = {n: default_of(n) for n in SQL_COLUMNS}
    fields.update((n, _decode(SQL_COLUMNS[n], v)) for n, v in zip(_stored(have), values))
    record = JobRecord(key=pickle.loads(key), **fields, curves={} if has_curves else None)
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        arrays = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    for (kind, name), arr in zip(json.loads(names), arrays):
        if kind == "timekeys":
            record.timekeys = arr
        elif kind == "grab":
            record.grabs[name] = arr
        else:
            record.curves[name] = arr  # type: ignore[index]
    return record


def load(run_dir: str | os.PathLike) -> Result:
    """The ``Result`` stored in a run folder (``SAVE_DIR``), in job order.

    Safe while a sweep is still writing: it returns the jobs finished so far (unfinished ones
    are absent from ``result.records`` and show as ``"missing"`` in ``to_xarray()``'s status).
    """
    run_dir = Path(run_dir)
    path = run_dir / DB_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a modelscape run folder (no {DB_NAME}); "
            "pass the SAVE_DIR of a sweep."
        )
    conn = _connect(path)
    try:
        # one read transaction: a consistent snapshot while the writer goes on
        conn.execute("BEGIN")
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        meta, rows, have = {}, [], set()
        if {"meta", "jobs", "records"} <= tables:
            meta = dict(conn.execute("SELECT name, value FROM meta"))
            have = _existing_columns(conn)
            rows = conn.execute(
                f"SELECT {_select_list(have)} FROM jobs j JOIN records r USING (key_id) "
                "ORDER BY j.idx"
            ).fetchall()
        conn.execute("COMMIT")
    finally:
        conn.close()
    if "description" not in meta:
        raise FileNotFoundError(f"{run_dir} holds no sweep yet (it is still being created).")
    description = json.loads(meta["description"])
    return Result(
        description["axes"],
        pickle.loads(meta["axis_values"]),
        [_unpack(have, r) for r in rows],
        only_thresholds=description["result"]["ONLYTHRESHOLDS"],
        config={"LOSS_CHECKPOINTS": description["result"]["LOSS_CHECKPOINTS"]},
    )


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class _FolderLock:
    """An exclusive lock on a run folder; the OS releases it when the process dies."""

    def __init__(self, run_dir: Path):
        self._file = open(run_dir / ".lock", "a+")  # noqa: SIM115 - held for the sweep's lifetime
        if os.name == "posix":
            import fcntl

            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._file.close()
                raise StoreError(
                    f"another sweep is writing to SAVE_DIR={run_dir}; wait for it to finish, "
                    "or use another SAVE_DIR. (modelscape.load() reads it meanwhile.)"
                ) from None

    def close(self) -> None:
        self._file.close()
