"""Turning the operating system's and SQLite's errors about a run folder into ``StoreError``.

Every open, read and write of a run folder goes through ``store_faults(path, doing)``. The
error that comes out names the file and says what to do, for the faults users meet: a disk
that is full, a location that is read-only, a SAVE_DIR that is a file, a damaged database.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from modelscape.errors import StoreError

_FULL = ("database or disk is full", "disk is full")
_READ_ONLY = ("readonly", "read-only")
_DAMAGED = ("malformed", "not a database", "file is encrypted", "disk i/o error")


@contextlib.contextmanager
def store_faults(path: Path, doing: str, folder: Path | None = None) -> Iterator[None]:
    """Raise the errors of the block as one ``StoreError`` about ``path`` (in run ``folder``)."""
    try:
        yield
    except StoreError:
        raise
    except (sqlite3.Error, OSError) as err:
        raise StoreError(describe(err, Path(path), doing, folder)) from err


def describe(err: BaseException, path: Path, doing: str, folder: Path | None = None) -> str:
    """What went wrong with ``path`` while ``doing``, and the fix."""
    text = str(err).lower()
    code = getattr(err, "errno", None)
    if code == errno.ENOSPC or code == errno.EDQUOT or any(s in text for s in _FULL):
        return (
            f"cannot {doing}: the disk holding {path} is full ({err}). Free space on it, then "
            "rerun the same sweep to continue (finished jobs are kept)."
        )
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or any(s in text for s in _READ_ONLY):
        return (
            f"cannot {doing}: {path} is on a read-only location or not writable ({err}). Use "
            "another SAVE_DIR on a writable disk, or make this one writable."
        )
    in_the_way = _file_in_the_way(Path(folder)) if folder is not None else None
    if in_the_way is not None:
        return (
            f"cannot {doing}: {in_the_way} is a file, not a folder. Use another SAVE_DIR, or "
            "move the file away."
        )
    if isinstance(err, sqlite3.DatabaseError) and any(s in text for s in _DAMAGED):
        return (
            f"cannot {doing}: {path} is damaged ({err}). Move it away and rerun the sweep with "
            "a new SAVE_DIR, or restore the file from a backup."
        )
    return f"cannot {doing}: {path}: {type(err).__name__}: {err}"


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` (itself included) if it is not a folder."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None
