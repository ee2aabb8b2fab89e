"""What a sweep shares across its jobs: the batch function, grabs, user keys, fixed test set.

``SweepSpec`` is the one object that travels to worker processes (by cloudpickle), so batch
functions, grabs, model classes and ``post_init_fn`` defined in a notebook, in ``__main__`` or
as closures all work there.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import torch

from modelscape.errors import SweepError

BatchFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def load_from_file(path: str | Path, name: str, what: str) -> Any:
    """Import ``name`` from a Python file (``bfn_file``/``bfn_name``, ``file.py:ClassName``)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{what}: file {path} does not exist.")
    mod_name = f"_modelscape_user_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    # worker processes cannot import this module by name: ship its functions by value
    cloudpickle.register_pickle_by_value(module)
    if not hasattr(module, name):
        public = [n for n in vars(module) if not n.startswith("_")]
        raise SweepError(f"{what}: {path} defines no {name!r}. It defines: {', '.join(public)}.")
    return getattr(module, name)


def accepted_kwargs(fn: Callable, candidates: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of ``candidates`` that ``fn`` takes (all of them if it has ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return dict(candidates)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(candidates)
    return {k: v for k, v in candidates.items() if k in params}


@dataclass(frozen=True)
class SampleShapes:
    """One sample of a batch: X's and y's shapes (without the sample dimension) and dtypes.

    The preflight reads them from the first job's training batch; the stacked engine sizes
    every job's stack from them (``engine/stacked/footprint.py``) before any job is set up.
    """

    x: tuple[int, ...]
    x_dtype: torch.dtype
    y: tuple[int, ...]
    y_dtype: torch.dtype

    @classmethod
    def of(cls, X: torch.Tensor, y: torch.Tensor) -> SampleShapes:
        return cls(tuple(X.shape[1:]), X.dtype, tuple(y.shape[1:]), y.dtype)

    def batch(self, n: int, dtype: torch.dtype, device: str | torch.device) -> tuple:
        """Zero (X, y) of ``n`` samples on ``device``; floating ones in ``dtype``, as a job's
        data reach its model (``setup.to_device``)."""
        return tuple(
            torch.zeros(n, *shape, dtype=dtype if like.is_floating_point else like, device=device)
            for shape, like in ((self.x, self.x_dtype), (self.y, self.y_dtype))
        )


@dataclass
class SweepSpec:
    """The functions and data every job of a sweep shares."""

    base_bfn: Callable[..., BatchFn]
    bfn_kwargs: dict[str, Any] = field(default_factory=dict)
    grabs: dict[str, Callable[..., Any]] = field(default_factory=dict)
    user_config: dict[str, Any] = field(default_factory=dict)
    X_te: torch.Tensor | None = None
    y_te: torch.Tensor | None = None
    post_init_fn: Callable[..., Any] | None = None
    # each grab's shape on the first job, set by the preflight: every job must return it
    grab_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # one sample of the first job's training batch, set by the preflight: what sizes stacks
    sample_shapes: SampleShapes | None = None

    @classmethod
    def from_configs(
        cls, bfn_config: Mapping[str, Any] | None, user_config: Mapping[str, Any]
    ) -> SweepSpec:
        """Build from the seed's ``bfn_config`` and the non-hyperparameter config keys."""
        if bfn_config is None:
            raise SweepError(
                "bfn_config is required: {'base_bfn': fn, **static_kwargs} or "
                "{'bfn_file': 'data.py', 'bfn_name': 'fn', **static_kwargs}."
            )
        bfn_kwargs = dict(bfn_config)
        if "base_bfn" in bfn_kwargs:
            base_bfn = bfn_kwargs.pop("base_bfn")
            bfn_kwargs.pop("bfn_file", None)
            bfn_kwargs.pop("bfn_name", None)
        elif "bfn_file" in bfn_kwargs:
            if "bfn_name" not in bfn_kwargs:
                raise SweepError("bfn_config has 'bfn_file' but no 'bfn_name' to load from it.")
            base_bfn = load_from_file(
                bfn_kwargs.pop("bfn_file"), bfn_kwargs.pop("bfn_name"), "bfn_config"
            )
        else:
            raise SweepError("bfn_config needs 'base_bfn' (a function) or 'bfn_file'+'bfn_name'.")
        if not callable(base_bfn):
            raise SweepError(f"bfn_config['base_bfn'] must be callable, got {base_bfn!r}.")
        user = dict(user_config)
        grabs = user.pop("otherreturns", None) or {}
        if not isinstance(grabs, Mapping):
            raise SweepError("otherreturns must be a dict {name: function}.")
        for name, fn in grabs.items():
            if not callable(fn):
                raise SweepError(
                    f"grab {name!r} is not callable ({fn!r}); grabs are functions taking **kwargs."
                )
            if name in ("train_loss", "test_loss"):
                raise SweepError(f"grab name {name!r} is reserved; rename it.")
        X_te, y_te = user.pop("X_te", None), user.pop("y_te", None)
        if (X_te is None) != (y_te is None):
            raise SweepError("give both X_te and y_te in global_config, or neither.")
        post_init_fn = user.pop("post_init_fn", None)
        if post_init_fn is not None and not callable(post_init_fn):
            raise SweepError(
                "post_init_fn must be a function (model, opt, **config) -> (model, opt)."
            )
        return cls(
            base_bfn=base_bfn,
            bfn_kwargs=bfn_kwargs,
            grabs=dict(grabs),
            user_config=user,
            X_te=_as_tensor(X_te),
            y_te=_as_tensor(y_te),
            post_init_fn=post_init_fn,
        )

    def listed_parameters(self) -> set[str]:
        """The names the base batch function's signature lists (not what ``**kwargs`` takes)."""
        try:
            params = inspect.signature(self.base_bfn).parameters
        except (TypeError, ValueError):
            return set()
        return {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}

    def make_batch_fn(
        self, *, bsz: int, gen: torch.Generator, X: Any, y: Any, job_values: Mapping[str, Any]
    ) -> BatchFn:
        """Call the base batch function with the seed protocol's arguments."""
        offered = {**self.user_config, **job_values}
        kwargs = {**accepted_kwargs(self.base_bfn, offered), **self.bfn_kwargs}
        fn = self.base_bfn(bsz=bsz, gen=gen, X=X, y=y, **kwargs)
        if not callable(fn):
            raise SweepError(f"base_bfn must return batch_fn(step) -> (X, y); it returned {fn!r}.")
        return fn


def _as_tensor(x: Any) -> torch.Tensor | None:
    if x is None or isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(x)


def check_batch(X: Any, y: Any, bsz: int, where: str) -> None:
    """A batch must be two tensors with ``bsz`` rows each."""
    if not isinstance(X, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise SweepError(
            f"{where}: batch_fn must return (X, y) tensors, got "
            f"({type(X).__name__}, {type(y).__name__})."
        )
    if X.shape[0] != y.shape[0]:
        raise SweepError(
            f"{where}: X has {X.shape[0]} rows but y has {y.shape[0]}; they must match."
        )
    if X.shape[0] != bsz:
        raise SweepError(f"{where}: asked for {bsz} samples, batch_fn returned {X.shape[0]}.")


def check_input_dim(d_in: int | None, X: Any) -> None:
    """D_IN (the original's DIM), when given, must be the data's feature count."""
    if d_in is None:
        return
    features = int(math.prod(X.shape[1:]))
    if d_in != features:
        raise SweepError(
            f"D_IN={d_in} (DIM in the original) but the batch function's X has {features} "
            f"features per sample (X.shape={tuple(X.shape)}); models are built for the data, "
            "so drop D_IN or make it match."
        )
