"""The identity of a sweep's code: a digest of its batch function, model classes and grabs.

A run folder stores these digests with the sweep's description (``store.describe`` compares
them). Resuming it with code whose digest changed is refused, like a changed hyperparameter,
because the new results would mix with the stored ones; ``RESUME_CHANGED_CODE=True`` allows it.

A digest covers a function's or class's own source text where Python can find it (a file or a
notebook cell), and otherwise its cloudpickled bytes. Code it calls (helpers, imported modules)
is not covered; modelscape's own models are identified by name.
"""

from __future__ import annotations

import hashlib
import inspect
import textwrap
from collections.abc import Sequence
from typing import Any

import cloudpickle

from modelscape.errors import SweepError
from modelscape.models.builtin import resolve_model_class
from modelscape.sweep.jobs import Job
from modelscape.sweep.spec import SweepSpec

# The engines' numerics: raise it with any change to the engine that alters the numbers a job
# trains to (a new kernel, a new random stream). A run folder stores it, and a resume across a
# change is refused (store/describe.py), so that one folder never mixes two engines' numbers.
# 1: the first; 2: nn.Dropout masks come from each job's own stream (engine/stateful.py);
# 3: stacks of the built-in MLP with CrossEntropyLoss train on the MLP kernel; stacked attention
#    by its math backend, stacked BatchNorm folded into channels (each: other rounding);
# 4: one-job runs on the CPU step Adam, AdamW, SGD and Adagrad with torch's fused kernel, and
#    train models with ``prefers_channels_last`` (the built-in CNN, ResNet) channels-last;
#    Dropout masks from float32 uniform draws (engine/stateful.py), not MKL's bernoulli_
NUMERICS_VERSION = 4


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
