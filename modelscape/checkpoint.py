"""Checkpoints of running jobs, so that a long job killed mid-way resumes where it was.

An engine asks ``Checkpoints.due()`` between steps (a cheap clock check, every CHECKPOINT_EVERY
seconds), and calls ``save(key, state)`` with everything needed to continue bit-identically:
model and optimizer state, EMA, step, RNG states and recorded curves. ``load(key)`` returns the
last saved state or None; ``clear(key)`` removes it once the job's record is stored.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import torch


class Checkpoints:
    """Checkpoint files under ``folder``, one per job (or group) key, written atomically."""

    def __init__(self, folder: str | Path, every_seconds: float):
        self.folder = Path(folder)
        self.every = float(every_seconds)
        self._last = time.monotonic()

    def _path(self, key: Any) -> Path:
        name = hashlib.sha256(repr(key).encode()).hexdigest()[:24]
        return self.folder / f"{name}.pt"

    def reset_clock(self) -> None:
        """Count CHECKPOINT_EVERY from now (an engine calls this when a job starts)."""
        self._last = time.monotonic()

    def due(self) -> bool:
        """True when CHECKPOINT_EVERY seconds have passed since the last save."""
        return time.monotonic() - self._last >= self.every

    def save(self, key: Any, state: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"key": repr(key), "state": state}, tmp)
        os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous checkpoint intact
        self._last = time.monotonic()

    def load(self, key: Any) -> dict[str, Any] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        blob = torch.load(path, map_location="cpu", weights_only=False)
        return blob["state"] if blob.get("key") == repr(key) else None

    def clear(self, key: Any) -> None:
        self._path(key).unlink(missing_ok=True)
