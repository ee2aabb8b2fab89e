"""A job's optimizer arguments: what OPTIMIZER_KWARGS, MOMENTUM and WEIGHT_DECAY pass to the
OPTIMIZER class, checked against its signature before anything trains (``preflight``) and used
by ``setup.setup_job`` to build it."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable
from typing import Any

import torch

from modelscape.errors import SweepError
from modelscape.sweep.jobs import Job
from modelscape.sweep.spec import SweepSpec


def optimizer_kwargs(opt_cls: type, job: Job) -> dict[str, Any]:
    """The optimizer's arguments besides the parameters and ``lr`` (which comes from LR).

    ``momentum`` and ``weight_decay`` come from MOMENTUM and WEIGHT_DECAY, every other argument
    from OPTIMIZER_KWARGS; nothing else (a user key or batch-function option named ``eps`` is
    not an optimizer argument). A name the optimizer does not take is an error.
    """
    params = inspect.signature(opt_cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    valid = [
        n for n, p in params.items() if n not in ("self", "params") and p.kind is not p.VAR_KEYWORD
    ]
    own = {"lr": "LR", "momentum": "MOMENTUM", "weight_decay": "WEIGHT_DECAY"}
    for name in job.hp.OPTIMIZER_KWARGS:
        if name in own:
            raise SweepError(
                f"OPTIMIZER_KWARGS has {name!r}: set {own[name]} instead (one name per value)."
            )
        if name not in valid and not takes_any:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            others = ", ".join(n for n in valid if n not in own)
            raise SweepError(
                f"OPTIMIZER_KWARGS has {name!r}, which {opt_cls.__name__} does not take.{hint} "
                f"Its arguments: {others}."
            )
    for name in ("momentum", "weight_decay"):
        value = getattr(job.hp, own[name])
        if value and name not in params:
            raise SweepError(
                f"{own[name]}={value} but {opt_cls.__name__} takes no {name} argument; set "
                f"{own[name]}=0 (arguments it takes: {', '.join(valid)})."
            )
    kwargs = {n: getattr(job.hp, own[n]) for n in ("momentum", "weight_decay") if n in params}
    return {**kwargs, **job.hp.OPTIMIZER_KWARGS}


def check_optimizer_lookalikes(opt_cls: type, spec: SweepSpec, model_cls: type) -> None:
    """A user key that nearly names one of the optimizer's arguments (``nesterow``) is a typo
    that would set nothing: refuse it, as OPTIMIZER_KWARGS does, unless the batch function or
    the model's constructor takes it by name (a model's ``beta``, say). (A key named exactly
    like an argument is already copied, with a warning.)
    """
    params = inspect.signature(opt_cls.__init__).parameters
    variadic = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    args = [n for n, p in params.items() if n not in ("self", "params") and p.kind not in variadic]
    listed = spec.listed_parameters() | set(inspect.signature(model_cls).parameters)
    for key in spec.user_config:
        if not isinstance(key, str) or key in params or key in listed:
            continue
        close = difflib.get_close_matches(key, args, n=1, cutoff=0.8)
        if close:
            raise SweepError(
                f"config key {key!r} is not an argument of {opt_cls.__name__}: did you mean "
                f"{close[0]!r}? Write OPTIMIZER_KWARGS={{{close[0]!r}: ...}} to set it, or, for a "
                f"key of your own, take {key!r} as a parameter of your batch function or your "
                "model's constructor."
            )


# torch's optimizers with a fused CPU kernel: one pass over each parameter per step instead of
# about ten ops (Adam). On a small model the op-by-op update is a fifth of a training step
# (benchmarks/NOTES.md, 2026-12-08); the stacked engine's Adam runs the same kernel.
FUSED_ON_CPU = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)
IMPLEMENTATION_ARGS = ("fused", "foreach", "differentiable", "capturable")


def implementation_kwargs(
    opt_cls: type, kwargs: dict[str, Any], params: Iterable[torch.Tensor], device: torch.device
) -> dict[str, Any]:
    """``{"fused": True}`` for a one-job run on the CPU whose optimizer torch has a fused kernel
    for (``FUSED_ON_CPU``, the classes themselves), with real floating-point parameters and
    none of ``IMPLEMENTATION_ARGS`` in OPTIMIZER_KWARGS (setting ``foreach`` or ``fused``
    there picks the implementation yourself); else ``{}``: torch's default. The numbers are
    the same update's to float rounding. CUDA keeps torch's default (never run on a GPU here).
    """
    if device.type != "cpu" or opt_cls not in FUSED_ON_CPU:
        return {}
    if any(name in kwargs for name in IMPLEMENTATION_ARGS):
        return {}
    if not all(p.is_floating_point() for p in params):
        return {}
    return {"fused": True}
