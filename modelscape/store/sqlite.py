"""``RunStore``, the run folder of a sweep (SAVE_DIR), and ``load``, which reads one back.

A run folder holds:

- ``config.json``: the resolved sweep description (see ``describe.py``), readable by eye;
- ``results.sqlite``: the job list and one row per finished job, each written in its own
  transaction as the job completes. The ``records`` table has one column per stored field of
  ``JobRecord`` (from the record schema in ``modelscape.results.records``): scalars are SQLite REALs
  (IEEE doubles, so lossless; NaN is stored as NULL) and INTEGERs, text is TEXT; arrays
  (timekeys, grabs, curves) are one ``.npz`` blob;
- ``checkpoints/``: the last checkpoint of each running job.

Every error of the operating system or SQLite about the folder becomes one ``StoreError``
naming the file and the fix (``faults.py``); one unreadable record is reported and left out.

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
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelscape.errors import StoreError
from modelscape.results.records import SQL_COLUMNS, JobRecord, default_of
from modelscape.results.result import Result
from modelscape.store.base import Store
from modelscape.store.checkpoints import Checkpoints
from modelscape.store.describe import FORMAT_VERSION, check_compatible, union_values
from modelscape.store.faults import store_faults
from modelscape.store.files import remove_stale_temporaries, write_atomic
from modelscape.sweep.jobs import Job, job_label, key_id

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
        self,
        run_dir: str | os.PathLike,
        conn: sqlite3.Connection,
        lock: _FolderLock | None,
        axes: Sequence[str] = (),
        checkpoint_every: float = 300.0,
    ):
        self.run_dir = Path(run_dir)
        self._conn = conn
        self._lock = lock
        self._have = _existing_columns(conn)
        self._axes = list(axes)
        self._checkpoints = Checkpoints(self.checkpoint_dir, checkpoint_every, self._axes)
        # what was opened: a folder deleted or replaced mid-sweep is noticed (check_in_place)
        self._opened = {p: _file_id(p) for p in (self.run_dir, self.path)}

    @property
    def path(self) -> Path:
        """The SQLite file."""
        return self.run_dir / DB_NAME

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    @property
    def checkpoints(self) -> Checkpoints:
        return self._checkpoints

    @classmethod
    def open(
        cls,
        run_dir: str | os.PathLike,
        description: Mapping[str, Any],
        jobs: Sequence[Job],
        axis_values: Sequence[Sequence[Any]],
        checkpoint_every: float = 300.0,
    ) -> RunStore:
        """Create the run folder, or resume it if it holds a compatible sweep.

        ``description`` is ``describe_sweep``'s output. A stored sweep with other axes or other
        shared job hyperparameters raises ``StoreError`` saying what differs. New iterator
        values extend the stored sweep. Running jobs checkpoint every ``checkpoint_every``
        seconds (CHECKPOINT_EVERY) into ``checkpoints``.
        """
        run_dir = Path(run_dir).resolve()  # user code may chdir while the sweep runs
        db = run_dir / DB_NAME
        with store_faults(run_dir, f"create the run folder SAVE_DIR={run_dir}", run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = _FolderLock(run_dir)
            # held by this sweep now: what a killed writer left behind is garbage
            remove_stale_temporaries(run_dir / CHECKPOINT_DIR)
        try:
            with store_faults(db, "open the sweep's store", run_dir):
                conn = _connect(db)
        except BaseException:
            lock.close()
            raise
        try:
            with store_faults(db, "open the sweep's store", run_dir):
                conn.execute("PRAGMA journal_mode = WAL")
                # NORMAL is durable against a killed process in WAL mode; FULL only adds
                # protection against power loss, at an fsync per job.
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.executescript(_SCHEMA)
                _add_missing_columns(conn)
                store = cls(run_dir, conn, lock, description["axes"], checkpoint_every)
                store._register(description, jobs, axis_values)
        except BaseException:
            conn.close()
            lock.close()
            raise
        return store

    @classmethod
    def reopen(cls, run_dir: str | os.PathLike) -> RunStore:
        """Open an existing run folder to add records to it, holding its lock.

        Raises ``StoreError`` while a sweep is writing the folder (that sweep stores them).
        """
        run_dir = Path(run_dir).resolve()
        if not (run_dir / DB_NAME).is_file():
            raise StoreError(f"{run_dir} is not a modelscape run folder (no {DB_NAME}).")
        lock = _FolderLock(run_dir)
        conn = _connect(run_dir / DB_NAME)
        row = conn.execute("SELECT value FROM meta WHERE name = 'description'").fetchone()
        axes = json.loads(row[0])["axes"] if row else ()
        return cls(run_dir, conn, lock, axes)

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
            has_records = self._conn.execute("SELECT 1 FROM records LIMIT 1").fetchone()
            check_compatible(self.run_dir, json.loads(stored), description, bool(has_records))
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
            if c.in_transaction:  # SQLite has already rolled back after a full disk
                c.execute("ROLLBACK")
            raise
        with store_faults(self.run_dir / CONFIG_NAME, "write the sweep's description"):
            _write_json(self.run_dir / CONFIG_NAME, description)

    def in_place(self) -> bool:
        """Whether the folder and the database this store opened are still at their paths."""
        return all(_file_id(p) == opened for p, opened in self._opened.items())

    def check_in_place(self, doing: str) -> None:
        """Raise ``StoreError`` if the run folder or its database was deleted or replaced since
        this store opened them: SQLite would go on writing to a file no path leads to."""
        for path, opened in self._opened.items():
            now = _file_id(path)
            if now != opened:
                what = "is gone" if now is None else "is another file now"
                raise StoreError(
                    f"cannot {doing}: the run folder {self.run_dir} was deleted or replaced while "
                    f"this sweep was writing it ({path} {what}). The records it held went with "
                    "it, and this sweep writes nothing more. Rerun the sweep to train its jobs "
                    "again (with this SAVE_DIR or another)."
                )

    def add(self, record: JobRecord) -> None:
        """Store ``record`` durably, then clear its job's checkpoint unless the job failed (a
        worker killed by the OOM killer, say, then continues from it under RETRY_FAILED)."""
        row = {"key_id": key_id(record.key), **_pack(record)}
        names = ", ".join(row)
        marks = ", ".join("?" * len(row))
        doing = f"store the record of job ({self._label(record.key)})"
        # one statement in autocommit mode: its own atomic transaction
        with store_faults(self.path, doing):
            self._conn.execute(
                f"INSERT OR REPLACE INTO records ({names}) VALUES ({marks})", tuple(row.values())
            )
        self.check_in_place(doing)  # after the write: a record written to a lost file is lost
        if record.status != "failed":
            self._checkpoints.clear(record.key)

    def get(self, key: tuple) -> JobRecord | None:
        """The job's record; None if it has none, or if its row cannot be read (with a warning)."""
        self.check_in_place(f"read the record of job ({self._label(key)})")
        with store_faults(self.path, f"read the record of job ({self._label(key)})"):
            row = self._conn.execute(
                f"SELECT {_select_list(self._have)} FROM records r JOIN jobs j USING (key_id) "
                "WHERE key_id = ?",
                (key_id(key),),
            ).fetchone()
        return None if row is None else _read_row(self._have, row, self.path, self._axes)

    def statuses(self) -> dict[str, str]:
        """``key_id -> status`` of every stored record that can be read.

        A row that cannot be read is reported in a warning and left out, so its job trains
        again.
        """
        with store_faults(self.path, "read the stored records"):
            rows = self._conn.execute(
                f"SELECT {_select_list(self._have)}, r.key_id "
                "FROM records r JOIN jobs j USING (key_id)"
            ).fetchall()
        readable = {}
        for row in rows:
            record = _read_row(self._have, row[:-1], self.path, self._axes)
            if record is not None:
                readable[row[-1]] = record.status
        return readable

    def count(self) -> int:
        """How many records are stored."""
        with store_faults(self.path, "count the stored records"):
            return self._conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    def _label(self, key: Sequence[Any]) -> str:
        return job_label(self._axes, key)

    def close(self) -> None:
        self._conn.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _file_id(path: Path) -> tuple[int, int] | None:
    """The device and inode at ``path`` (None if nothing is there): a file's identity."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


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
        return None if value is None else int(value)  # NULL where the column allows it
    return value


def _decode(sql: str, value: Any) -> Any:
    kind = sql.split()[0]
    if kind == "REAL":
        return float("nan") if value is None else float(value)
    if kind == "INTEGER":
        return None if value is None else int(value)
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


def _read_row(
    have: set[str], row: Sequence[Any], path: Path, axes: Sequence[str]
) -> JobRecord | None:
    """The record in ``row``; None, with a warning naming the job and the file, if unreadable."""
    try:
        return _unpack(have, row)
    except Exception as err:  # noqa: BLE001 - one damaged row must not hide the others
        try:
            label = job_label(axes, pickle.loads(row[0]))
        except Exception:  # noqa: BLE001 - the key itself is damaged
            label = "with a damaged key"
        warnings.warn(
            f"the stored record of job ({label}) in {path} cannot be read "
            f"({type(err).__name__}: {err}); it is left out. Rerun the same sweep to train that "
            "job again.",
            UserWarning,
            stacklevel=3,
        )
        return None


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
    A record that cannot be read is reported in a warning and left out; a damaged store raises
    ``StoreError`` naming the file and the fix. A folder on a read-only disk loads too.
    """
    run_dir = Path(run_dir)
    path = run_dir / DB_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a modelscape run folder (no {DB_NAME}); "
            "pass the SAVE_DIR of a sweep."
        )
    with store_faults(path, "read the run folder", run_dir):
        meta, rows, have = _read_all(path)
    if "description" not in meta:
        wal = path.with_name(f"{DB_NAME}-wal")
        if not wal.exists():
            raise StoreError(
                f"{path} holds no sweep, and its write-ahead log {wal} is missing: a sweep that "
                "did not close cleanly keeps its records in that file. If you copied the run "
                f"folder, copy {wal.name} (and {DB_NAME}-shm) along with {DB_NAME}."
            )
        raise FileNotFoundError(f"{run_dir} holds no sweep yet (it is still being created).")
    description = json.loads(meta["description"])
    records = [_read_row(have, r, path, description["axes"]) for r in rows]
    return Result(
        description["axes"],
        pickle.loads(meta["axis_values"]),
        [r for r in records if r is not None],
        only_thresholds=description["result"]["ONLYTHRESHOLDS"],
        config={
            # the hyperparameters no axis sets (an axis's values are the jobs'), as described
            **description.get("sweep_hparams", {}),
            **description["job_hparams"],
            "LOSS_CHECKPOINTS": description["result"]["LOSS_CHECKPOINTS"],
        },
    )


def _read_all(path: Path) -> tuple[dict[str, Any], list[Any], set[str]]:
    """The meta table, every record row and the record columns, as one consistent snapshot."""
    try:
        return _read_with(_connect(path))
    except sqlite3.OperationalError:
        if os.access(path.parent, os.W_OK):
            raise
    # a run folder on a read-only disk: nothing writes it, so SQLite may read it as immutable
    return _read_with(sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True))


def _read_with(conn: sqlite3.Connection) -> tuple[dict[str, Any], list[Any], set[str]]:
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
        return meta, rows, have
    finally:
        conn.close()


def _write_json(path: Path, data: Any) -> None:
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


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
