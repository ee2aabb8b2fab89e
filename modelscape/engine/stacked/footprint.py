"""What one job takes in a stack, before anything is built: ``job_bytes``.

A job's share of a stack is its parameters several times over (``held_bytes`` counts what
``run``, ``stack`` and ``optimizers`` hold per job), its buffers, its data, and the activations
autograd saves in one training step. The parameters, buffers and activations are counted on the
job's own model (``model_bytes``): built on the meta device (no memory, no time) and run once on
a batch of the job's size under ``saved_tensors_hooks``, once per shape, since every job of a
shape builds the same model. A model whose constructor or forward pass cannot run on the meta
device is built once on the CPU instead (a debug log says so); one that cannot be built at all
is sized by the MLP formula (``formula_bytes``), with a warning. Sizing never fails a sweep.

The count depends on the job's hyperparameters, the sweep's sample shapes (the preflight's
``SweepSpec.sample_shapes``) and the values its model's constructor takes, so a job's size,
and its ``grouping.group_cap``, are the same in every run. On CUDA, ``memory`` measures the real
footprint once a group has trained and sizes later chunks from it.
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from modelscape.engine.setup import job_config, kept_global_rngs, model_spec, output_dim
from modelscape.engine.stacked.optimizers import STACKED_OPTIMIZERS
from modelscape.models.builtin import resolve_model_class
from modelscape.sweep import hparams as H
from modelscape.sweep.jobs import Job, hashable
from modelscape.sweep.spec import SweepSpec

_log = logging.getLogger(__name__)

# the hyperparameters a job's model, and the batch it runs on, are built from
BUILD_FIELDS = ("MODEL_CLASS", "WIDTH", "DEPTH", "NONLINEARITY", "BIAS", "D_OUT", "DTYPE",
                "N_SAMPLES")  # fmt: skip
_MISSING = object()
# a model whose parameters and buffers take at most this many bytes is counted on the CPU
# (``_fitted_activations``); larger ones on the meta device
SMALL_MODEL = 64 * 2**20


@dataclass(frozen=True)
class ModelBytes:
    """One job's model, counted: bytes of its parameters, of its buffers, and of the tensors
    autograd saves in one training step at its batch size; its output dimension; and where it
    was built to be counted."""

    params: int
    buffers: int
    activations: int
    d_out: int
    built_on: Literal["meta", "cpu"]
    convolutional: bool = False  # whether it has convolution layers (``grouping.why_single``)


_MODELS: dict[tuple, ModelBytes | None] = {}  # _key -> the model's count (None: not countable)
_CONSTRUCTOR_NAMES: dict[Any, tuple[str, ...]] = {}  # MODEL_CLASS -> its arguments' config keys


def job_bytes(job: Job, spec: SweepSpec | None) -> int:
    """Bytes one job takes in a stack (``held_bytes`` of its model, ``model_bytes``).
    ``spec``: the sweep, whose sample shapes the preflight set; without them (None, or a spec
    no preflight saw), or for a model that cannot be built, the MLP formula."""
    model = None if spec is None or spec.sample_shapes is None else model_bytes(job, spec)
    return formula_bytes(job) if model is None else held_bytes(job, spec, model)


def held_bytes(job: Job, spec: SweepSpec, model: ModelBytes) -> int:
    """What a job of ``model`` holds in a stack: its parameters several times over, its
    buffers, the activations of one training step, its optimizer state and its data."""
    hp = job.hp
    opt = STACKED_OPTIMIZERS.get(_optimizer_class(hp.OPTIMIZER))
    slots = 0 if opt is None else opt.max_slots
    online_center = hp.CENTER and hp.ONLINE
    # its own module, its rows of the stack and their gradients, the optimizer's slots, the
    # window's snapshot for replays (parameters and slots), the slots exported into its torch
    # optimizer (checkpoints, grabs), and with CENTER its initial model (online, also that
    # model's rows of the stack)
    param_copies = 4 + 3 * slots + hp.CENTER + online_center
    # its module's, the stack's rows and the snapshot; online centering the initial model's too
    buffer_copies = 3 + 2 * online_center
    return (
        param_copies * model.params
        + buffer_copies * model.buffers
        + model.activations
        + _data_bytes(job, spec, model.d_out)
    )


def _data_bytes(job: Job, spec: SweepSpec, d_out: int) -> int:
    """Its test set, and its training samples twice (its own and its rows of the stack; online,
    the batch drawn and the stacked one), with CENTER each sample's f_init output too."""
    hp = job.hp
    dtype = getattr(torch, hp.DTYPE)
    shapes = spec.sample_shapes
    per_sample = sum(
        math.prod(shape) * (dtype if like.is_floating_point else like).itemsize
        for shape, like in ((shapes.x, shapes.x_dtype), (shapes.y, shapes.y_dtype))
    )
    per_sample += d_out * dtype.itemsize if hp.CENTER else 0
    n_test = hp.N_TEST if spec.X_te is None else len(spec.X_te)
    return per_sample * (n_test + 2 * hp.N_SAMPLES)


def formula_bytes(job: Job) -> int:
    """A rough size of an MLP job, from WIDTH, DEPTH and N_SAMPLES alone (WIDTH stands in for
    the input dimension): weights with gradients, optimizer state and a snapshot, plus the
    activations of one step. What sizes jobs whose model cannot be counted."""
    hp = job.hp
    itemsize = 8 if hp.DTYPE == "float64" else 4
    weights = hp.WIDTH * hp.WIDTH * hp.DEPTH + 2 * hp.WIDTH
    activations = hp.N_SAMPLES * hp.WIDTH * (2 * hp.DEPTH + 2)
    return itemsize * (6 * weights + 2 * activations)


def model_bytes(job: Job, spec: SweepSpec) -> ModelBytes | None:
    """The job's model counted at its batch size (once per shape), or None, with a warning,
    when it cannot be built."""
    try:
        key = _key(job, spec)
    except Exception as err:  # noqa: BLE001 - sizing never fails a sweep; the job reports it
        _warn_formula(job, err)
        return None
    if key not in _MODELS:
        try:
            # a constructor draws from the global generators: leave the caller's as they were
            with kept_global_rngs(torch.device("cpu")):
                _MODELS[key] = _count(job, spec)
        except Exception as err:  # noqa: BLE001 - sizing never fails a sweep; the job reports it
            _warn_formula(job, err)
            _MODELS[key] = None
    return _MODELS[key]


def _warn_formula(job: Job, err: Exception) -> None:
    warnings.warn(
        f"modelscape: the jobs of MODEL_CLASS={job.hp.MODEL_CLASS!r} could not be built to size "
        f"their stacks ({type(err).__name__}: {err}); they are sized by the MLP formula, so a "
        "stack may be too large for the device (it is then split in two) or smaller than need be.",
        stacklevel=3,
    )


def _key(job: Job, spec: SweepSpec) -> tuple:
    """Everything ``_count`` builds from: the build's hyperparameters, the sample shapes and
    every config value the model's constructor takes by name (a user axis such as HEADS)."""
    hp = job.hp
    taken = []
    for name in _constructor_names(hp.MODEL_CLASS):
        value = _config_value(job, spec, name)
        if value is not _MISSING:
            taken.append((name, hashable(value)))
    return (
        tuple(hashable(getattr(hp, n)) for n in BUILD_FIELDS),
        spec.sample_shapes,
        tuple(taken),
    )


def _constructor_names(model_class: Any) -> tuple[str, ...]:
    """The config keys a model class's constructor arguments come from (``width`` <- WIDTH).
    Cached per MODEL_CLASS: a class given as a file path is read once per process."""
    key = hashable(model_class)
    if key not in _CONSTRUCTOR_NAMES:
        params = inspect.signature(resolve_model_class(model_class).__init__).parameters
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        names = [n.upper() for n, p in list(params.items())[1:] if p.kind not in variadic]
        _CONSTRUCTOR_NAMES[key] = tuple(names)
    return _CONSTRUCTOR_NAMES[key]


def _config_value(job: Job, spec: SweepSpec, name: str) -> Any:
    """``job_config(job, spec).get(name)``, without building the whole config."""
    if name in job.values:
        return job.values[name]
    if name in H.FIELDS:
        return getattr(job.hp, name)
    return spec.user_config.get(name, _MISSING)


def _optimizer_class(opt: Any) -> Any:
    return opt if isinstance(opt, type) else getattr(torch.optim, str(opt), None)


def _count(job: Job, spec: SweepSpec) -> ModelBytes:
    """Build the job's model on the meta device, else once on the CPU, and count it."""
    hp = job.hp
    dtype = getattr(torch, hp.DTYPE)
    X, y = spec.sample_shapes.batch(hp.N_SAMPLES, dtype, "meta")
    d_out = output_dim(y, hp.D_OUT)[0]
    model_cls, kwargs = model_spec(job, job_config(job, spec), spec.sample_shapes.x, d_out)
    built_on: Literal["meta", "cpu"] = "meta"
    try:
        with torch.device("meta"):
            model = model_cls(**kwargs).to(dtype).train()
        state = sum(_nbytes(t) for t in _state(model).values())
        if state <= SMALL_MODEL:
            activations = _fitted_activations(model, spec, dtype, hp.N_SAMPLES)
        else:
            with torch.device("meta"):
                activations = _saved_bytes(model, _state(model), X)
    except Exception as err:  # noqa: BLE001 - a constructor may need real numbers
        _log.debug("%s cannot run on the meta device (%s); counting a CPU build", model_cls, err)
        built_on = "cpu"
        model = model_cls(**kwargs).to(dtype).train()
        activations = _cpu_model_activations(model, X)
    params = sum(_nbytes(p) for p in model.parameters())
    buffers = sum(_nbytes(b) for b in model.buffers())
    convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return ModelBytes(params, buffers, activations, d_out, built_on, convolutional)


def _fitted_activations(model: nn.Module, spec: SweepSpec, dtype: torch.dtype, n: int) -> int:
    """``_saved_bytes`` at ``n`` samples of a small meta-built model, counted on the CPU with
    zeros for its state at 2, 4 and 8 samples and extrapolated by the quadratic through them
    (exact for activations linear in the batch, and for a batch's Gram matrix). A forward pass
    on the meta device would first import torch's compiler stack (~0.9 s per process) for
    convolutions' shape rules; this takes milliseconds."""
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for t in _state(model).values():
            t.zero_()
    sizes = (2, 4, 8) if n > 8 else (n,)
    counts = [_saved_bytes(model, _state(model), spec.sample_shapes.batch(k, dtype, "cpu")[0])
              for k in sizes]  # fmt: skip
    if len(sizes) == 1:
        return counts[0]
    a, b, c = counts  # at 2, 4, 8: second differences give the quadratic's coefficient
    quad = ((c - b) / 4 - (b - a) / 2) / 6
    lin = (b - a) / 2 - 6 * quad
    return max(0, round(a - 2 * lin - 4 * quad + lin * n + quad * n * n))


def _cpu_model_activations(model: nn.Module, X: torch.Tensor) -> int:
    """``_saved_bytes`` of a model built on the CPU: on the meta device if its forward pass
    runs there (no memory, no time), else on a batch of zeros."""
    state = _state(model)
    try:
        with torch.device("meta"):
            meta = {
                n: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
                for n, t in state.items()
            }
            return _saved_bytes(model, meta, X)
    except Exception as err:  # noqa: BLE001 - a forward pass may need real numbers
        _log.debug("%s's forward pass cannot run on the meta device (%s)", type(model), err)
    return _saved_bytes(model, state, torch.zeros_like(X, device="cpu"))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _saved_bytes(model: nn.Module, state: dict[str, torch.Tensor], X: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves in one training forward pass of ``model`` with
    ``state`` on ``X``, and of its output (which the loss keeps): each storage once, the
    state's and the input's left out (they are counted apart)."""
    seen = {_storage_id(t) for t in (*state.values(), X)}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = _storage_id(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = torch.func.functional_call(model, state, (X,))
    return total + _nbytes(out)


def _storage_id(t: torch.Tensor) -> int:
    # views share their base's storage; meta tensors have no data pointer to tell them apart
    return t.untyped_storage()._cdata


def _nbytes(t: torch.Tensor) -> int:
    return math.prod(t.shape) * t.element_size()
