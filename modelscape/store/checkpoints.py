"""Checkpoint files of running jobs, in the run folder's ``checkpoints/``.

Each file is checked (written atomically, with a checksum: ``files.write_checked``) and named
after the job's values (``trial=1,GAMMA=0.5--<hash>.pt``); a damaged one costs only that job's
progress. An engine asks ``Checkpoints.due()`` between steps (a cheap clock check, every
CHECKPOINT_EVERY seconds) and calls ``save(key, state)`` with what it needs to continue
bit-identically (``engine.state.job_state_dict``). ``load(key)`` returns the last saved state or
None; the store clears a job's file once its record is stored (``RunStore.add``).
"""

from __future__ import annotations

import hashlib
import io
import re
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from modelscape.store.files import free_bytes, read_checked, write_checked
from modelscape.sweep.jobs import job_label, key_id

RESERVE_BYTES = 64 << 20
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")


class Checkpoints:
    """Checkpoint files under ``folder``, one per job key, named after the job's values.

    Each file is written atomically with a checksum (``modelscape.store.files``); one that is
    damaged is discarded with a warning naming the job and the file, and the job restarts from
    step 0. A checkpoint is skipped, with one warning, when writing it would leave less than
    ``RESERVE_BYTES`` free on the disk: the results need that space more.
    """

    def __init__(self, folder: str | Path, every_seconds: float, axes: Sequence[str] = ()):
        self.folder = Path(folder)
        self.every = float(every_seconds)
        self.axes = tuple(axes)
        self._last = time.monotonic()
        self._warned_space = False

    def label(self, key: Any) -> str:
        """``trial=1, GAMMA=0.5``: the job's values, as job labels show them."""
        return job_label(self.axes, key)

    def _path(self, key: Any, identity: str | None = None) -> Path:
        """The job's file, named after its values and a digest of its identity (``key_id``: a
        job is one file whichever equal form its values take, ``0.1`` or ``np.float64(0.1)``)."""
        identity = key_id(key) if identity is None else identity
        digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
        prefix = _UNSAFE.sub("_", self.label(key).replace(", ", ","))[:80]
        return self.folder / f"{prefix}--{digest}.pt"

    def _paths(self, key: Any) -> list[tuple[Path, str]]:
        """Where the job's checkpoint may be, with the identity stored in it: its file, then the
        file of a checkpoint written before files were named by ``key_id`` (by ``repr(key)``;
        resumed from, then cleared)."""
        return [(self._path(key), key_id(key)), (self._path(key, repr(key)), repr(key))]

    def reset_clock(self) -> None:
        """Count CHECKPOINT_EVERY from now (an engine calls this when a job starts)."""
        self._last = time.monotonic()

    def due(self) -> bool:
        """True when CHECKPOINT_EVERY seconds have passed since the last save."""
        return time.monotonic() - self._last >= self.every

    def save(self, key: Any, state: dict[str, Any]) -> None:
        """Write the job's state, unless the disk is nearly full (then warn once and skip)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save({"key": key_id(key), "state": state}, buf)
        payload = buf.getvalue()
        self._last = time.monotonic()
        free = free_bytes(self.folder)
        if free < len(payload) + RESERVE_BYTES:
            if not self._warned_space:
                self._warned_space = True
                warnings.warn(
                    f"skipping checkpoints in {self.folder}: its disk has {free >> 20} MiB "
                    f"free, and checkpoints leave {RESERVE_BYTES >> 20} MiB free for the "
                    "results. Free space to resume checkpointing; jobs still train and store "
                    "their results.",
                    UserWarning,
                    stacklevel=2,
                )
            return
        write_checked(self._path(key), payload)

    def load(self, key: Any) -> dict[str, Any] | None:
        """The job's last saved state; None if there is none or it is damaged (discarded)."""
        found = [(path, identity) for path, identity in self._paths(key) if path.is_file()]
        if not found:
            return None
        path, identity = found[0]
        try:
            payload = io.BytesIO(read_checked(path))
            blob = torch.load(payload, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is discarded
            warnings.warn(
                f"the checkpoint of job ({self.label(key)}) at {path} is unreadable ({err}); "
                "it is discarded and the job restarts from step 0.",
                UserWarning,
                stacklevel=2,
            )
            path.unlink(missing_ok=True)
            return None
        return blob["state"] if blob.get("key") == identity else None

    def clear(self, key: Any) -> None:
        for path, _ in self._paths(key):
            path.unlink(missing_ok=True)
