"""Checkpoints of running jobs, so that a long job killed mid-way resumes where it was.

This module owns the checkpoint files (``Checkpoints``) and what a job's checkpoint holds
(``snapshot``/``restore``): the loop state (``tracking.Track.loop_state``), the model and
optimizer state and the RNG states. Both engines save and restore through these, so a job saved
by one resumes in the other.

Checkpoint files are checked (atomic, with a checksum) and named after the job's values
(``trial=1,GAMMA=0.5--<hash>.pt``); a damaged one costs only that job's progress.

An engine asks ``Checkpoints.due()`` between steps (a cheap clock check, every CHECKPOINT_EVERY
seconds), and calls ``save(key, state)`` with everything needed to continue bit-identically:
model and optimizer state, EMA, step, RNG states and recorded curves. ``load(key)`` returns the
last saved state or None; ``clear(key)`` removes it once the job's record is stored.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import time
import warnings
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelscape.engine.setup import GlobalRngs, Problem
from modelscape.engine.tracking import Track, say_resumed
from modelscape.store.files import free_bytes, read_checked, write_checked

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
        if len(self.axes) == len(key):
            return ", ".join(f"{a}={v}" for a, v in zip(self.axes, key))
        return repr(key)

    def _path(self, key: Any) -> Path:
        digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
        prefix = _UNSAFE.sub("_", self.label(key).replace(", ", ","))[:80]
        return self.folder / f"{prefix}--{digest}.pt"

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
        torch.save({"key": repr(key), "state": state}, buf)
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
        path = self._path(key)
        if not path.is_file():
            return None
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
        return blob["state"] if blob.get("key") == repr(key) else None

    def clear(self, key: Any) -> None:
        self._path(key).unlink(missing_ok=True)


def training_state(problem: Problem, copy: bool = False) -> dict[str, Any]:
    """What a training step changes: parameters and buffers, optimizer, data generator and the
    global generators (torch's, numpy's, Python's). ``copy``: copies that later steps leave
    alone (the one-job loop's rewind point); else the module's own tensors, for a checkpoint
    written at once."""
    model = problem.model.state_dict()
    opt = problem.opt.state_dict()
    if copy:
        model, opt = {k: v.clone() for k, v in model.items()}, deepcopy(opt)
    state: dict[str, Any] = {
        "model": model,
        "opt": opt,
        "gen": None if problem.gen is None else problem.gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
    }
    if problem.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(problem.device)
    return state


def load_training_state(problem: Problem, state: dict[str, Any]) -> None:
    """Put ``training_state``'s values back into the job (and the global generators)."""
    problem.model.load_state_dict(state["model"])
    problem.opt.load_state_dict(state["opt"])
    if problem.gen is not None:
        problem.gen.set_state(state["gen"])
    torch.set_rng_state(state["torch_rng"])
    if "numpy_rng" in state:  # a checkpoint written before numpy's generator was seeded
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
    if "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], problem.device)


def snapshot(problem: Problem, track: Track, seconds: float) -> dict[str, Any]:
    """Everything needed to continue the job bit-identically from after ``track.step``.

    Call it with torch's global RNG in the job's own state (the one-job loop's, or the state a
    stacked run keeps per job).
    """
    return {"seed": problem.job.seed, **track.loop_state(seconds), **training_state(problem)}


def restore(problem: Problem, checkpoints: Checkpoints | None) -> tuple[Track, GlobalRngs | None]:
    """The job's track, from its checkpoint if it has one (loaded into the freshly set-up
    ``problem``, with the global generators set to the saved states), else a fresh one.

    Returns the track and the restored global generators' states (None for a fresh start).
    """
    saved = None if checkpoints is None else checkpoints.load(problem.job.key)
    if saved is None or saved["seed"] != problem.job.seed:
        return Track.start(problem.job), None
    load_training_state(problem, saved)
    track = Track.resume(problem.job, saved)
    say_resumed(problem.job, track.step)
    return track, GlobalRngs.now()
