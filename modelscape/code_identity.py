"""The identity of a sweep's code: a digest of its batch function, model classes and grabs.

A run folder stores these digests with the sweep's description. Resuming it with code whose
digest changed is refused, like a changed hyperparameter, because the new results would mix
with the stored ones; ``RESUME_CHANGED_CODE=True`` allows it.

A digest covers a function's or class's own source text where Python can find it (a file or a
notebook cell), and otherwise its cloudpickled bytes. Code it calls (helpers, imported modules)
is not covered; modelscape's own models are identified by name.
"""

from __future__ import annotations

import hashlib
import inspect
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import cloudpickle

from modelscape.jobs import Job, SweepError
from modelscape.models import resolve_model_class
from modelscape.sweep import SweepSpec

SECTION = "code"


def code_digest(obj: Any) -> str:
    """A short digest of ``obj``'s source, or of its pickled bytes when it has no source."""
    try:
        data = textwrap.dedent(inspect.getsource(obj)).encode()
        kind = "source"
    except (OSError, TypeError):
        try:
            data = cloudpickle.dumps(obj)
        except Exception:  # noqa: BLE001 - an unpicklable object is reported where it is sent
            return "<no source, not picklable>"
        kind = "pickled"
    return f"{kind} sha256:{hashlib.sha256(data).hexdigest()[:16]}"


def describe_code(spec: SweepSpec, jobs: Sequence[Job]) -> dict[str, str]:
    """``{what: digest}`` for the user code every job of the sweep runs."""
    out = {"batch function": code_digest(spec.base_bfn)}
    for name, fn in sorted(spec.grabs.items()):
        out[f"grab {name!r}"] = code_digest(fn)
    if spec.post_init_fn is not None:
        out["post_init_fn"] = code_digest(spec.post_init_fn)
    for model in {repr(job.hp.MODEL_CLASS): job.hp.MODEL_CLASS for job in jobs}.values():
        cls = _user_class(model)
        if cls is not None:
            out[f"model {cls.__qualname__}"] = code_digest(cls)
    return out


def _user_class(model: Any) -> type | None:
    try:
        cls = resolve_model_class(model)
    except SweepError:
        return None  # the preflight reports a bad MODEL_CLASS
    return None if cls.__module__.startswith("modelscape.") else cls


def code_changes(stored: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """Lines naming each piece of code that differs between a run folder and this sweep."""
    lines = []
    for what in sorted(set(stored) | set(current)):
        old, new = stored.get(what), current.get(what)
        if old != new:
            before = "absent" if old is None else old
            now = "absent" if new is None else new
            lines.append(f"  {what}: {before} in the run folder, {now} now")
    return lines


def changed_code_message(run_dir: Any, lines: Sequence[str]) -> str:
    """The refusal to resume ``run_dir`` with changed code, saying what changed and the fix."""
    return (
        f"SAVE_DIR={run_dir} holds results of other code than this sweep's:\n"
        + "\n".join(lines)
        + "\nResuming would mix results of the old and the new code. Use a new SAVE_DIR, or "
        "set RESUME_CHANGED_CODE=True if the change does not affect results (a comment, a "
        "rename)."
    )
