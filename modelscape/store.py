"""Where results live: in memory (``MemoryStore``) or in a run folder (``RunStore``).

A run folder (``SAVE_DIR``) holds:

- ``config.json``: the resolved sweep description (axes, the job hyperparameters every job
  shares, sweep settings, user keys), readable by eye;
- ``results.sqlite``: the job list and one row per finished job, each written in its own
  transaction as the job completes. Scalars are SQLite REALs (IEEE doubles, so lossless; NaN is
  stored as NULL), arrays (timekeys, grabs, curves) an ``.npz`` blob, failures keep their
  message and traceback;
- ``checkpoints/``: the last checkpoint of each running job (see ``modelscape.checkpoint``).

SQLite runs in WAL mode: a SIGKILL at any moment loses at most the jobs that were in flight,
and ``load(run_dir)`` reads a consistent snapshot even while a sweep is still writing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelscape.jobs import Job, SweepError, stable_repr
from modelscape.results import JobRecord, Result

FORMAT_VERSION = 1
DB_NAME = "results.sqlite"
CONFIG_NAME = "config.json"
CHECKPOINT_DIR = "checkpoints"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    idx INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id TEXT UNIQUE NOT NULL,
    key BLOB NOT NULL,
    seed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    key_id TEXT PRIMARY KEY REFERENCES jobs(key_id),
    status TEXT NOT NULL,
    seed INTEGER NOT NULL,
    train_loss REAL,
    test_loss REAL,
    steps INTEGER NOT NULL,
    seconds REAL NOT NULL,
    device TEXT NOT NULL,
    error TEXT,
    traceback TEXT,
    array_names TEXT NOT NULL,
    arrays BLOB NOT NULL,
    has_curves INTEGER NOT NULL,
    finished_at REAL NOT NULL
);
"""


def key_id(key: Sequence[Any]) -> str:
    """The text identity of a job key, equal in every process and every run."""
    return repr(tuple(stable_repr(v) for v in key))


class Store(ABC):
    """Records keyed by job key; the last record for a key wins."""

    @abstractmethod
    def add(self, record: JobRecord) -> None:
        """Keep ``record`` (durably, for a persistent store, before returning)."""

    @abstractmethod
    def get(self, key: tuple) -> JobRecord | None:
        """The record of the job with this key, or None if it has not finished."""

    @abstractmethod
    def close(self) -> None:
        """Release files and locks."""


class MemoryStore(Store):
    """Records in memory for the sweep's lifetime (SAVE_DIR=None)."""

    def __init__(self) -> None:
        self._records: dict[tuple, JobRecord] = {}

    def add(self, record: JobRecord) -> None:
        self._records[record.key] = record

    def get(self, key: tuple) -> JobRecord | None:
        return self._records.get(key)

    def records(self) -> list[JobRecord]:
        return list(self._records.values())

    def close(self) -> None:
        """Nothing to release: the records stay readable."""


def _connect(path: Path) -> sqlite3.Connection:
    # timeout: a reader may briefly hold the lock while the writer commits
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


class RunStore(Store):
    """The SQLite store of a run folder. The sweep's parent process is its only writer."""

    def __init__(
        self, run_dir: str | os.PathLike, conn: sqlite3.Connection, lock: _FolderLock | None
    ):
        self.run_dir = Path(run_dir)
        self._conn = conn
        self._lock = lock

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
        shared job hyperparameters raises ``SweepError`` saying what differs. New iterator
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
            store = cls(run_dir, conn, lock)
            store._register(description, jobs, axis_values)
        except BaseException:
            conn.close()
            lock.close()
            raise
        return store

    @classmethod
    def reopen(cls, run_dir: str | os.PathLike) -> RunStore:
        """Open an existing run folder to add records to it, holding its lock.

        Raises ``SweepError`` while a sweep is writing the folder (that sweep stores them).
        """
        run_dir = Path(run_dir)
        if not (run_dir / DB_NAME).is_file():
            raise FileNotFoundError(f"{run_dir} is not a modelscape run folder (no {DB_NAME}).")
        lock = _FolderLock(run_dir)
        return cls(run_dir, _connect(run_dir / DB_NAME), lock)

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
            axis_values = [_union(old, new) for old, new in zip(old_values, axis_values)]
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
        names, blob = _pack_arrays(record)
        row = (
            key_id(record.key),
            record.status,
            int(record.seed),
            _real(record.train_loss),
            _real(record.test_loss),
            int(record.steps),
            float(record.seconds),
            record.device,
            record.error,
            record.traceback,
            json.dumps(names),
            blob,
            int(record.curves is not None),
            time.time(),
        )
        # one statement in autocommit mode: its own atomic transaction
        self._conn.execute(
            "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row
        )

    def get(self, key: tuple) -> JobRecord | None:
        row = self._conn.execute(
            f"SELECT {_RECORD_COLUMNS} FROM records r JOIN jobs j USING (key_id) WHERE key_id = ?",
            (key_id(key),),
        ).fetchone()
        return None if row is None else _unpack_record(row)

    def statuses(self) -> dict[str, str]:
        """``key_id -> status`` of every stored record."""
        return dict(self._conn.execute("SELECT key_id, status FROM records"))

    def close(self) -> None:
        self._conn.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


_RECORD_COLUMNS = (
    "j.key, r.status, r.seed, r.train_loss, r.test_loss, r.steps, r.seconds, r.device, "
    "r.error, r.traceback, r.array_names, r.arrays, r.has_curves"
)


def _real(x: float) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def _float(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _pack_arrays(record: JobRecord) -> tuple[list[list[str]], bytes]:
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
    return names, buf.getvalue()


def _unpack_record(row: Sequence[Any]) -> JobRecord:
    (key, status, seed, train, test, steps, seconds, device, error, tb, names, blob, has_curves) = (
        row
    )
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        arrays = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    record = JobRecord(
        key=pickle.loads(key),
        seed=int(seed),
        status=status,
        train_loss=_float(train),
        test_loss=_float(test),
        steps=int(steps),
        seconds=float(seconds),
        device=device,
        error=error,
        traceback=tb,
        curves={} if has_curves else None,
    )
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
        meta, rows = {}, []
        if {"meta", "jobs", "records"} <= tables:
            meta = dict(conn.execute("SELECT name, value FROM meta"))
            rows = conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM jobs j JOIN records r USING (key_id) ORDER BY j.idx"
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
        [_unpack_record(r) for r in rows],
        only_thresholds=description["result"]["ONLYTHRESHOLDS"],
        config={"LOSS_CHECKPOINTS": description["result"]["LOSS_CHECKPOINTS"]},
    )


def describe_sweep(
    axes: Sequence[str],
    jobs: Sequence[Job],
    fixed_hparams: Mapping[str, Any],
    sweep_hparams: Mapping[str, Any],
    user_config: Mapping[str, Any],
    bfn_kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    """The JSON description of a sweep stored in its run folder.

    ``fixed_hparams``, plain-data ``user_config`` values and ``bfn_kwargs`` are what a resumed
    sweep must agree on; ``sweep_hparams`` (devices, workers...) may change between runs.
    """
    first = jobs[0].hp
    return {
        "format": FORMAT_VERSION,
        "axes": list(axes),
        "job_hparams": {k: _describe(v) for k, v in fixed_hparams.items()},
        "user_config": {k: _describe(v) for k, v in user_config.items()},
        "bfn_kwargs": {k: _describe(v) for k, v in bfn_kwargs.items()},
        "sweep_hparams": {k: _describe(v) for k, v in sweep_hparams.items()},
        "result": {
            "ONLYTHRESHOLDS": first.ONLYTHRESHOLDS,
            "LOSS_CHECKPOINTS": first.LOSS_CHECKPOINTS,
        },
        "n_jobs": len(jobs),
    }


_UNCOMPARED = "<not compared: "


def _describe(value: Any) -> Any:
    """Plain data as is; a class by name; an array by a digest of its contents; anything else
    by its repr, or a note that it is not compared."""
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, torch.Tensor) or (
        isinstance(value, np.ndarray) and not value.dtype.hasobject  # object bytes are pointers
    ):
        # a repr truncates large arrays, so it would miss a change in the middle of a data pool
        return _array_digest(value)
    try:
        json.dumps(value, allow_nan=True)
        if not isinstance(value, tuple):
            return value
    except (TypeError, ValueError):
        pass
    try:
        return stable_repr(value)
    except SweepError:
        return f"{_UNCOMPARED}{type(value).__name__}>"


def _array_digest(value: torch.Tensor | np.ndarray) -> str:
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        raw = data.flatten().view(torch.uint8).numpy().tobytes()  # any dtype, bfloat16 included
        kind = "tensor"
    else:
        data = np.ascontiguousarray(value)
        raw = data.tobytes()
        kind = "ndarray"
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return f"{kind}{tuple(data.shape)} {data.dtype} sha256:{digest}"


def check_compatible(run_dir: Path, stored: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse to resume a run folder that holds a different sweep, saying what differs."""
    if stored.get("format") != FORMAT_VERSION:
        raise SweepError(
            f"SAVE_DIR={run_dir} was written by another modelscape store format "
            f"({stored.get('format')}); use a new SAVE_DIR."
        )
    if stored["axes"] != current["axes"]:
        raise SweepError(
            f"SAVE_DIR={run_dir} holds a sweep over axes {stored['axes']}, but this sweep's axes "
            f"are {current['axes']}. Resuming needs the same iterator names in the same order "
            "(you may add values to them); use a new SAVE_DIR for a different sweep."
        )
    diffs = []
    for section in ("job_hparams", "user_config", "bfn_kwargs"):
        old, new = stored[section], current[section]
        for name in sorted(set(old) | set(new)):
            a, b = old.get(name, _ABSENT), new.get(name, _ABSENT)
            if _comparable(a) and _comparable(b) and a != b:
                diffs.append(f"  {name}: {_show(a)} in the run folder, {_show(b)} now")
    if diffs:
        raise SweepError(
            f"SAVE_DIR={run_dir} holds a sweep whose jobs were trained with other settings:\n"
            + "\n".join(diffs)
            + "\nSet them back to resume that sweep, or use a new SAVE_DIR for the new "
            "settings. To compare values of one setting, make it an iterator (in a new SAVE_DIR)."
        )


_ABSENT = object()


def _show(value: Any) -> str:
    return "not set" if value is _ABSENT else repr(value)


def _comparable(value: Any) -> bool:
    return not (isinstance(value, str) and value.startswith(_UNCOMPARED))


def _union(old: Iterable[Any], new: Iterable[Any]) -> list[Any]:
    """Axis values of both runs: the stored order first, then the new values."""
    out = list(old)
    seen = {stable_repr(v) for v in out}
    for v in new:
        if stable_repr(v) not in seen:
            seen.add(stable_repr(v))
            out.append(v)
    return out


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
                raise SweepError(
                    f"another sweep is writing to SAVE_DIR={run_dir}; wait for it to finish, "
                    "or use another SAVE_DIR. (modelscape.load() reads it meanwhile.)"
                ) from None

    def close(self) -> None:
        self._file.close()
