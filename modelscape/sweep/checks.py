"""Checks of a sweep's hyperparameters, data and grabs that catch silent nonsense before training.

- Values a type alone does not catch (``check_ranges``): sizes > 0, EMA_SMOOTHER in [0, 1),
  DEVICES entries, a field that configures one EXECUTOR set for another.

- Targets that do not fit the loss: ``CrossEntropyLoss``/``NLLLoss`` with float targets whose
  rows are not probabilities (they train to negative "losses"), and integer class labels under
  a regression loss such as ``MSELoss`` (an ``(n, 1)`` output broadcasts against ``(n,)``
  labels into an ``(n, n)`` difference).
- Data that is not finite: NaN or infinite inputs or targets would train into NaN losses that
  read as divergence (or, in the test set, into a NaN test loss of an "ok" job). The preflight
  checks the first job's training batch and test set; every job checks its own test set and
  fixed training set (or first online batch) once, and fails with a message that says so.
- Grabs: the preflight calls every grab once on the first job, so a grab that raises or returns
  a non-number fails before training, and the shape it returns there is the shape every job's
  grab must return. A grab whose shape differs between jobs (a ragged grab) is refused at its
  first call in that job, which fails that job only: results of different shapes could not be
  stacked into one array by ``load()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from modelscape.errors import HParamError, SweepError

CLASS_LOSSES = ("CrossEntropyLoss", "NLLLoss")
REGRESSION_LOSSES = ("MSELoss", "L1Loss", "SmoothL1Loss", "HuberLoss")
PROBABILITY_TOLERANCE = 1e-3


def loss_name(loss: Any) -> str:
    """The class name of a LOSS given by name or as a class."""
    return loss if isinstance(loss, str) else getattr(loss, "__name__", repr(loss))


def check_targets(loss: Any, y: torch.Tensor, where: str) -> None:
    """Raise ``SweepError`` when targets ``y`` cannot mean what ``loss`` computes."""
    name = loss_name(loss)
    if name in CLASS_LOSSES and y.is_floating_point():
        problem = _not_probabilities(y)
        if problem is not None:
            raise SweepError(
                f"{where}: LOSS={name} with float targets treats each row of y as class "
                f"probabilities, but {problem}. Give integer class labels (y.long(), with D_OUT "
                "= the number of classes), rows of probabilities (one-hot, or soft labels "
                "summing to 1), or a regression loss such as LOSS='MSELoss'."
            )
    if name in REGRESSION_LOSSES and not (y.is_floating_point() or y.is_complex()):
        raise SweepError(
            f"{where}: y holds integer class labels (dtype {y.dtype}), but LOSS={name} compares "
            "outputs with targets as numbers; with D_OUT=1 an (n, 1) output would broadcast "
            "against (n,) labels. Use float targets (y.float(), or one-hot rows with D_OUT = "
            "the number of classes), or D_OUT = the number of classes with "
            "LOSS='CrossEntropyLoss'."
        )


def _not_probabilities(y: torch.Tensor) -> str | None:
    """What makes float targets fail to be rows of probabilities, or None if they are."""
    if y.ndim < 2:
        return (
            f"y has shape {tuple(y.shape)}, one number per sample (class labels stored as floats?)"
        )
    rows = y.detach().to("cpu", torch.float64)
    negative = (rows < 0).nonzero()
    if len(negative):
        i = tuple(int(k) for k in negative[0])
        return f"y{list(i)} = {float(rows[i]):.4g} is negative"
    sums = rows.sum(dim=1)
    bad = ((sums - 1).abs() > PROBABILITY_TOLERANCE).nonzero()
    if len(bad):
        i = tuple(int(k) for k in bad[0])
        return f"row {i[0]} sums to {float(sums[i]):.4g}, not 1"
    return None


def check_finite(X: torch.Tensor, y: torch.Tensor, where: str) -> None:
    """Raise ``SweepError`` when the inputs or targets hold NaN or infinite values."""
    for name, t in (("X", X), ("y", y)):
        if not (t.is_floating_point() or t.is_complex()):
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            first = tuple(int(k) for k in bad.nonzero()[0])
            raise SweepError(
                f"{where}: {name} holds {int(bad.sum())} NaN or infinite values (the first, "
                f"{name}{list(first)}, is {t[first].item()}). Training on them gives NaN losses "
                "that look like divergence; fix the data (drop or impute those samples) in the "
                "batch function."
            )


def check_grab_shape(name: str, value: np.ndarray, expected: Mapping[str, tuple]) -> None:
    """A grab returns the shape it returned in the preflight, in every job and at every call."""
    if name in expected and tuple(value.shape) != tuple(expected[name]):
        raise SweepError(
            f"grab {name!r} returned shape {tuple(value.shape)}, but on the sweep's first job "
            f"it returned {tuple(expected[name])}. A grab must return one shape in every job, "
            "so that results stack into one array: pad to a fixed size, or return a summary "
            "number."
        )


def check_ranges(h: Any) -> None:
    """Value checks of resolved hyperparameters (``HParams``) that a type alone does not catch."""
    positive = ["N_SAMPLES", "N_TRAIN", "N_TEST", "NUM_TRIALS", "MAX_ITER", "DEPTH", "WIDTH",
                "EVAL_EVERY", "WORKERS_PER_DEVICE"]  # fmt: skip
    for name in positive:
        if name == "WORKERS_PER_DEVICE" and h.WORKERS_PER_DEVICE == "auto":
            continue  # chosen per sweep (execution/local.py, workers_per_device)
        if getattr(h, name) <= 0:
            raise HParamError(f"{name} must be > 0, got {getattr(h, name)}.")
    if not 0.0 <= h.EMA_SMOOTHER < 1.0:
        raise HParamError(f"EMA_SMOOTHER must be in [0, 1), got {h.EMA_SMOOTHER}.")
    for name in ("D_IN", "D_OUT"):
        if getattr(h, name) is not None and getattr(h, name) <= 0:
            raise HParamError(
                f"{name} must be > 0 (or None to read it from the data), got {getattr(h, name)}."
            )
    if h.PRECISION != "fp32" and h.DTYPE != "float32":
        raise HParamError(f"PRECISION={h.PRECISION!r} needs DTYPE='float32', not {h.DTYPE!r}.")
    if h.GAMMA <= 0:
        raise HParamError(f"GAMMA must be > 0, got {h.GAMMA}.")
    if not h.LOSS_CHECKPOINTS:
        raise HParamError("LOSS_CHECKPOINTS needs at least one threshold, e.g. [0.1].")
    if not h.DEVICES:
        raise HParamError("DEVICES needs at least one entry, e.g. [0] or ['cpu'].")
    for d in h.DEVICES:
        if not (d == "cpu" or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)):
            raise HParamError(f"DEVICES entries are CUDA ids (0, 1, ...) or 'cpu'; got {d!r}.")
    for f in dataclasses.fields(h):  # a field that configures one executor only
        executor = f.metadata["executor"]
        if executor and getattr(h, f.name) and h.EXECUTOR != executor:
            raise HParamError(f"{f.name}={getattr(h, f.name)!r} needs EXECUTOR={executor!r}.")
    if h.CHECKPOINT_EVERY <= 0:
        raise HParamError(
            f"CHECKPOINT_EVERY is in seconds and must be > 0, got {h.CHECKPOINT_EVERY}."
        )
    for name, zero in (("LR", "frozen"), ("MAX_RETRIES", "no retry"), ("JOB_TIMEOUT", "off")):
        if getattr(h, name) < 0:
            raise HParamError(f"{name} must be >= 0 (0: {zero}), got {getattr(h, name)}.")
