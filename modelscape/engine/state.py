"""Checkpoints of running jobs, so that a long job killed mid-way resumes where it was.

This module owns the checkpoint files (``Checkpoints``) and what a job's checkpoint holds
(``snapshot``/``restore``): the loop state (``tracking.Track.loop_state``), the model and
optimizer state and the RNG states. Both engines save and restore through these, so a job saved
by one resumes in the other.

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

from modelscape.engine.setup import Problem
from modelscape.engine.tracking import Track, say_resumed


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


def snapshot(problem: Problem, track: Track, seconds: float) -> dict[str, Any]:
    """Everything needed to continue the job bit-identically from after ``track.step``.

    Call it with torch's global RNG in the job's own state (the one-job loop's, or the state a
    stacked run keeps per job).
    """
    state: dict[str, Any] = {
        "seed": problem.job.seed,
        **track.loop_state(seconds),
        "model": problem.model.state_dict(),
        "opt": problem.opt.state_dict(),
        "gen": None if problem.gen is None else problem.gen.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    if problem.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(problem.device)
    return state


def restore(problem: Problem, checkpoints: Checkpoints | None) -> tuple[Track, torch.Tensor | None]:
    """The job's track, from its checkpoint if it has one (loaded into the freshly set-up
    ``problem``, with torch's global RNG set to the saved state), else a fresh one.

    Returns the track and the restored global RNG state (None for a fresh start).
    """
    saved = None if checkpoints is None else checkpoints.load(problem.job.key)
    if saved is None or saved["seed"] != problem.job.seed:
        return Track.start(problem.job), None
    problem.model.load_state_dict(saved["model"])
    problem.opt.load_state_dict(saved["opt"])
    if problem.gen is not None:
        problem.gen.set_state(saved["gen"])
    torch.set_rng_state(saved["torch_rng"])
    if "cuda_rng" in saved:
        torch.cuda.set_rng_state(saved["cuda_rng"], problem.device)
    track = Track.resume(problem.job, saved)
    say_resumed(problem.job, track.step)
    return track, saved["torch_rng"]
