"""What a run folder records about its sweep, and whether a rerun may resume it.

``describe_sweep`` gives the JSON description stored as ``config.json`` (axes, the job
hyperparameters every job shares, sweep settings, user keys, the batch function's options);
``check_compatible`` refuses to resume a folder whose sweep differs, saying what differs.
``array_digest`` is the one text identity of a tensor or array's contents.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelscape._version import VERSION
from modelscape.errors import RunFolderMismatch, StoreError, SweepError
from modelscape.sweep import hparams as H
from modelscape.sweep.code_identity import NUMERICS_VERSION
from modelscape.sweep.jobs import Job, axis_target, job_fingerprint, stable_repr
from modelscape.sweep.spec import SweepSpec

FORMAT_VERSION = 1


def describe_sweep(axes: Sequence[str], jobs: Sequence[Job], spec: SweepSpec) -> dict[str, Any]:
    """The JSON description of a sweep stored in its run folder.

    The job hyperparameters every job shares (those no axis sets), plain-data user config
    values, a fixed test set (by digest) and the batch function's options are what a resumed
    sweep must agree on; the sweep hyperparameters (devices, workers...) may change between
    runs.
    """
    first = jobs[0].hp
    targets = {axis_target(n) for n in axes}
    fixed = {k: v for k, v in job_fingerprint(jobs[0]).items() if k not in targets}
    user = dict(spec.user_config)
    if spec.X_te is not None:
        user["X_te"] = array_digest(spec.X_te)
        user["y_te"] = array_digest(spec.y_te)
    return {
        "format": FORMAT_VERSION,
        "axes": list(axes),
        "job_hparams": {k: _describe(v) for k, v in fixed.items()},
        "user_config": {k: _describe(v) for k, v in user.items()},
        "bfn_kwargs": {k: _describe(v) for k, v in spec.bfn_kwargs.items()},
        "sweep_hparams": {k: _describe(getattr(first, k)) for k in H.SWEEP_FIELDS},
        "result": {
            "ONLYTHRESHOLDS": first.ONLYTHRESHOLDS,
            "LOSS_CHECKPOINTS": first.LOSS_CHECKPOINTS,
        },
        "n_jobs": len(jobs),
        ENGINE_SECTION: {"modelscape": VERSION, "numerics": NUMERICS_VERSION},
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
        return array_digest(value)
    try:
        json.dumps(value, allow_nan=True)
        if not isinstance(value, tuple):
            return value
    except (TypeError, ValueError):
        pass
    try:
        return stable_repr(value)
    except SweepError:  # no stable text form: the value is shown, not compared
        return f"{_UNCOMPARED}{type(value).__name__}>"


def array_digest(value: torch.Tensor | np.ndarray) -> str:
    """A short text identity of an array's shape, dtype and contents (any dtype)."""
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


def check_compatible(
    run_dir: Path, stored: Mapping[str, Any], current: Mapping[str, Any], has_records: bool = True
) -> None:
    """Refuse to resume a run folder that holds a different sweep, saying what differs.

    Changed code (the ``CODE_SECTION`` digests) is refused only when the folder holds records
    (there is nothing to mix otherwise) and RESUME_CHANGED_CODE is off.
    """
    if stored.get("format") != FORMAT_VERSION:
        raise StoreError(
            f"SAVE_DIR={run_dir} was written by another modelscape store format "
            f"({stored.get('format')}); use a new SAVE_DIR."
        )
    if stored["axes"] != current["axes"]:
        raise RunFolderMismatch(
            f"SAVE_DIR={run_dir} holds a sweep over axes {stored['axes']}, but this sweep's axes "
            f"are {current['axes']}. Resuming needs the same iterator names in the same order "
            "(you may add values to them); use a new SAVE_DIR for a different sweep."
        )
    diffs = []
    for section in ("job_hparams", "user_config", "bfn_kwargs"):
        old, new = stored[section], current[section]
        for name in sorted(set(old) | set(new)):
            a, b = old.get(name, _ABSENT), new.get(name, _ABSENT)
            if section == "job_hparams" and a is _ABSENT and name in H.DEFAULTS:
                # a hyperparameter added since the folder was written: its jobs had the default
                a = _describe(H.DEFAULTS[name])
            if _comparable(a) and _comparable(b) and a != b:
                diffs.append(f"  {name}: {_show(a)} in the run folder, {_show(b)} now")
    if diffs:
        raise RunFolderMismatch(
            f"SAVE_DIR={run_dir} holds a sweep whose jobs were trained with other settings:\n"
            + "\n".join(diffs)
            + "\nSet them back to resume that sweep, or use a new SAVE_DIR for the new "
            "settings. To compare values of one setting, make it an iterator (in a new SAVE_DIR)."
        )
    allowed = current.get("sweep_hparams", {}).get("RESUME_CHANGED_CODE", False)
    if has_records:
        _check_numerics(run_dir, stored, current, allowed)
    # folders written before code digests have none to compare
    if CODE_SECTION in stored and has_records and not allowed:
        changes = _code_changes(stored[CODE_SECTION], current.get(CODE_SECTION, {}))
        if changes:
            raise StoreError(
                f"SAVE_DIR={run_dir} holds results of other code than this sweep's:\n"
                + "\n".join(changes)
                + "\nResuming would mix results of the old and the new code. Use a new "
                "SAVE_DIR, or set RESUME_CHANGED_CODE=True if the change does not affect results "
                "(a comment, a rename)."
            )


def _check_numerics(
    run_dir: Path, stored: Mapping[str, Any], current: Mapping[str, Any], allowed: bool
) -> None:
    """Refuse to add results of other engine numerics to a folder's records.

    A folder written before the engine section existed holds numerics version 1 (the numerics
    of every modelscape that did not store it). RESUME_CHANGED_CODE=True resumes anyway, with a
    warning naming both versions: the numbers of the two engines then sit in one folder.
    """
    old = stored.get(ENGINE_SECTION, {"modelscape": "before 0.1.0", "numerics": 1})
    new = current[ENGINE_SECTION]
    if old["numerics"] == new["numerics"]:
        return
    what = (
        f"SAVE_DIR={run_dir} holds results of modelscape {old['modelscape']} (engine numerics "
        f"version {old['numerics']}), and this is modelscape {new['modelscape']} (engine "
        f"numerics version {new['numerics']}): the engine now trains to other numbers"
    )
    if not allowed:
        raise StoreError(
            f"{what}, so resuming would mix two engines' results. Use a new SAVE_DIR, or set "
            "RESUME_CHANGED_CODE=True to add the new engine's results to this folder anyway."
        )
    warnings.warn(
        f"{what}; RESUME_CHANGED_CODE=True adds its results to the folder anyway.",
        UserWarning,
        stacklevel=H.user_stacklevel(),
    )


def _code_changes(stored: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    lines = []
    for what in sorted(set(stored) | set(current)):
        old, new = stored.get(what, "absent"), current.get(what, "absent")
        if old != new:
            lines.append(f"  {what}: {old} in the run folder, {new} now")
    return lines


_ABSENT = object()
ENGINE_SECTION = "engine"  # modelscape's version and the engine's NUMERICS_VERSION
CODE_SECTION = "code"  # the digests of the sweep's code (``modelscape.sweep.code_identity``)


def _show(value: Any) -> str:
    return "not set" if value is _ABSENT else repr(value)


def _comparable(value: Any) -> bool:
    return not (isinstance(value, str) and value.startswith(_UNCOMPARED))


def union_values(old: Iterable[Any], new: Iterable[Any]) -> list[Any]:
    """Axis values of both runs: the stored order first, then the new values."""
    out = list(old)
    seen = {stable_repr(v) for v in out}
    for v in new:
        if stable_repr(v) not in seen:
            seen.add(stable_repr(v))
            out.append(v)
    return out
