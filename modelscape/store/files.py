"""Files written atomically (``write_atomic``: every file modelscape writes outside SQLite), and
checked files, read back only if intact (checkpoints).

``write_atomic`` writes to a temporary name beside the file, flushes it to disk (fsync) and
renames it over the old file, so a kill or a power cut at any moment leaves either the old file
or the new one, and a reader on another node never sees half a file.

A checked file is a short header (a magic string and the SHA-256 of the payload) followed by
the payload, written by ``write_atomic``. ``read_checked`` raises ``DamagedFile`` saying what is
wrong when the file is truncated, overwritten or not a checked file at all; a flipped byte
anywhere is caught by the checksum. A kill mid-write leaves the temporary file
``.<name>.tmp-<host>-<pid>``, which ``remove_stale_temporaries`` clears once that host's writer
is gone (files of writers on other nodes of a cluster, which share the folder, are kept).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
from pathlib import Path

MAGIC = b"MODELSCAPE-CHECKED-1\n"
DIGEST_BYTES = 32
# the host names the writer too: a run folder on a shared file system has writers on other nodes
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
# ".tmp-<host>-<pid>"; ".tmp<pid>" as written before the host was named (this host's)
_TEMPORARY = re.compile(r"\.tmp(?:-(?P<host>[A-Za-z0-9._]+)-)?(?P<pid>\d+)$")


class DamagedFile(ValueError):
    """A checked file is truncated, corrupt, or was not written by ``write_checked``."""


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (fsync before the rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_checked(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically, with a checksum."""
    write_atomic(path, MAGIC + hashlib.sha256(payload).digest() + payload)


def read_checked(path: Path) -> bytes:
    """The payload of a checked file; ``DamagedFile`` if it is not intact."""
    data = path.read_bytes()
    head = len(MAGIC) + DIGEST_BYTES
    if not data.startswith(MAGIC):
        raise DamagedFile(f"{len(data)} bytes without the checked-file header")
    if len(data) < head:
        raise DamagedFile(f"truncated to {len(data)} bytes")
    payload = data[head:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC) : head]:
        raise DamagedFile("its checksum does not match its contents (truncated or corrupted)")
    return payload


def free_bytes(folder: Path) -> int:
    """Free space on the file system holding ``folder`` (or its nearest existing parent)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files in ``folder`` whose writer is no longer running (a process
    killed mid-write leaves one, as large as the file it was writing); return them.

    A writer is known by the host and process id in the name: a file of a process that still
    runs, or of another host (a SLURM task on another node may be writing it), is kept, as it
    may still be renamed into place.
    """
    removed = []
    for path in sorted(Path(folder).glob("*.tmp*")):
        match = _TEMPORARY.search(path.name)
        if match is None or match["host"] not in (None, _HOST):
            continue
        if not _running(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
