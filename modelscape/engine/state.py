"""What a job's checkpoint holds, so that a long job killed mid-way resumes where it was.

``job_state_dict``/``load_checkpoint``: the loop state (``tracking.Track.state_dict``), the
model and optimizer state and the RNG states. Both engines save and restore through these, so a
job saved by one resumes in the other. Every piece of state saves and loads under torch's names
(``state_dict``, ``load_state_dict``, and ``from_state_dict`` for a constructor).

The files themselves are the run folder's (``modelscape.store.checkpoints``): an engine asks
``Checkpoints.due()`` between steps and saves ``job_state_dict``'s state.
"""

from __future__ import annotations

import random
from copy import deepcopy
from typing import Any

import numpy as np
import torch

from modelscape.engine.setup import GlobalRngs, Problem
from modelscape.engine.tracking import Track, say_resumed
from modelscape.store.checkpoints import Checkpoints


def training_state_dict(problem: Problem, copy: bool = False) -> dict[str, Any]:
    """What a training step changes: parameters and buffers, optimizer, data generator and the
    global generators (torch's, numpy's, Python's). ``copy``: copies that later steps leave
    alone (the one-job loop's rewind point); else the module's own tensors, for a checkpoint
    written at once."""
    model = problem.model.state_dict()
    opt = problem.opt.state_dict()
    if copy:
        model, opt = {k: v.clone() for k, v in model.items()}, _cloned(opt)
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


def _cloned(obj: Any) -> Any:
    """A copy of a state dict that later steps leave alone: tensors cloned, plain containers
    rebuilt, immutable values shared, anything else deep-copied (``deepcopy`` of the whole
    was a third of the one-job loop's bookkeeping)."""
    kind = type(obj)
    if kind is dict:
        return {k: _cloned(v) for k, v in obj.items()}
    if kind is list or kind is tuple:
        return kind(_cloned(v) for v in obj)
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if obj is None or kind in (bool, int, float, str):
        return obj
    return deepcopy(obj)


def load_training_state_dict(problem: Problem, state: dict[str, Any]) -> None:
    """Put ``training_state_dict``'s values back into the job (and the global generators)."""
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


def job_state_dict(problem: Problem, track: Track, seconds: float) -> dict[str, Any]:
    """Everything needed to continue the job bit-identically from after ``track.step``.

    Call it with torch's global RNG in the job's own state (the one-job loop's, or the state a
    stacked run keeps per job).
    """
    return {"seed": problem.job.seed, **track.state_dict(seconds), **training_state_dict(problem)}


def load_checkpoint(
    problem: Problem, checkpoints: Checkpoints | None
) -> tuple[Track, GlobalRngs | None]:
    """The job's track, from its checkpoint if it has one (loaded into the freshly set-up
    ``problem``, with the global generators set to the saved states), else a fresh one.

    Returns the track and the restored global generators' states (None for a fresh start).
    """
    saved = None if checkpoints is None else checkpoints.load(problem.job.key)
    if saved is None or saved["seed"] != problem.job.seed:
        return Track.start(problem.job), None
    load_training_state_dict(problem, saved)
    track = Track.from_state_dict(problem.job, saved)
    say_resumed(problem.job, track.step)
    return track, GlobalRngs.now()
