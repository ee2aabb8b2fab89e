"""What a job trains on: ``setup_job`` turns a ``Job`` into a ``Problem``.

This module owns drawing a job's data (each stream from its named sub-seed), building its model,
optimizer (with OPTIMIZER_KWARGS, MOMENTUM and WEIGHT_DECAY) and loss, the centering caches,
and evaluation of the test loss and of grabs (``modelscape.preflight`` builds models through
it before a sweep trains). Both engines (``loop`` and ``stacked``) start from a ``Problem``, so
a job's data and initial weights do not depend on which engine trains it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from modelscape.engine.optimizer import implementation_kwargs, optimizer_kwargs
from modelscape.errors import SweepError
from modelscape.models import parametrize
from modelscape.models.builtin import constructor_kwargs, resolve_model_class, standard_kwargs
from modelscape.sweep.checks import check_finite, check_grab_shape
from modelscape.sweep.jobs import Job, SubSeeds
from modelscape.sweep.spec import BatchFn, SweepSpec, accepted_kwargs, check_batch

EVAL_CHUNK = 8192  # rows per forward pass when evaluating the test set, to bound memory


def resolve_device(spec: int | str) -> torch.device:
    """A DEVICES entry as a torch device; a CUDA id without CUDA falls back to the CPU."""
    if spec == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        if int(spec) >= torch.cuda.device_count():
            raise SweepError(
                f"DEVICES has {spec}, but only {torch.cuda.device_count()} CUDA "
                "devices are visible."
            )
        return torch.device("cuda", int(spec))
    return torch.device("cpu")


def resolve_class(spec: Any, module: Any, what: str) -> type:
    """A torch class given by name (``"SGD"``, ``"MSELoss"``) or as a class.

    An unknown name is an error that suggests the nearest valid one and lists the choices of
    its kind: losses for LOSS (not every ``torch.nn`` layer), optimizers for OPTIMIZER.
    """
    if isinstance(spec, type):
        return spec
    cls = getattr(module, spec, None)
    if not isinstance(cls, type):
        names = sorted(n for n in dir(module) if _is_choice(getattr(module, n), n, module))
        guess = difflib.get_close_matches(spec, names, n=1, cutoff=0.6)
        hint = f" Did you mean {guess[0]}?" if guess else ""
        raise SweepError(
            f"{what}={spec!r} is not in {module.__name__}.{hint} Choices: {', '.join(names)}."
        )
    return cls


def _is_choice(obj: Any, name: str, module: Any) -> bool:
    if not isinstance(obj, type) or name.startswith("_"):
        return False
    if module is torch.nn:
        return issubclass(obj, torch.nn.modules.loss._Loss)
    if module is torch.optim:
        return issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer
    return True


@dataclass
class Problem:
    """Everything one job trains on, built once before its first step."""

    job: Job
    device: torch.device
    model: nn.Module
    opt: torch.optim.Optimizer
    loss_fn: nn.Module
    gamma: float
    X_te: torch.Tensor
    y_te: torch.Tensor
    f0_te: torch.Tensor | None
    X_tr: torch.Tensor | None = None  # offline only: the fixed training set
    y_tr: torch.Tensor | None = None
    f0_tr: torch.Tensor | None = None  # offline centering cache
    batch_fn: BatchFn | None = None  # online only
    gen: torch.Generator | None = None  # the training data's generator (its state is checkpointed)
    model0: nn.Module | None = None  # online centering: a frozen copy of the initial model
    squeeze: bool = False  # y is 1-D, the model's (n, 1) output is squeezed
    config: dict[str, Any] = field(default_factory=dict)  # what grabs and user code receive
    grabs: dict[str, Callable[..., Any]] = field(default_factory=dict)
    grab_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # see checks.py
    step: int = 0  # the step being trained: where a failure happened

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The training batch for ``step`` and its centering offset."""
        if self.batch_fn is None:
            return self.X_tr, self.y_tr, self.f0_tr  # type: ignore[return-value]
        X, y = self.batch_fn(step)
        if step == 0:
            check_batch(X, y, self.job.hp.N_SAMPLES, "batch_fn(0)")
            check_finite(X, y, f"job ({self.job.label()}), batch_fn(0)")
        X, y = to_device(X, y, self.device, self.job.hp.DTYPE)
        f0 = None
        if self.model0 is not None:
            with torch.no_grad():
                f0 = self.model0(X)
        return X, y, f0

    def output(self, X: torch.Tensor, f0: torch.Tensor | None) -> torch.Tensor:
        """The trained function: (f(x) - f_init(x)) / GAMMA."""
        out = self.model(X)
        if f0 is not None:
            out = out - f0
        if self.gamma != 1:  # dividing by 1 is exact: skipped, with its backward
            out = out / self.gamma
        return out.squeeze(-1) if self.squeeze else out

    @torch.no_grad()
    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """The trained function at ``X``, as the loss sees it: (f(x) - f_init(x)) / GAMMA.

        In eval mode (no dropout; the model's mode is restored) and without gradients, in
        chunks of EVAL_CHUNK rows. ``X`` moves to the job's device and DTYPE. The test and
        training sets use the f_init values cached when the job was set up.
        """
        if X is self.X_te:
            f0_all = self.f0_te
        elif X is self.X_tr:
            f0_all = self.f0_tr
        else:
            dtype = getattr(torch, self.job.hp.DTYPE) if X.is_floating_point() else X.dtype
            X = X.to(self.device, dtype)
            f0_all = None if self.model0 is None else _chunked(self.model0, X)
        was_training = self.model.training
        self.model.eval()
        try:
            outs = []
            for start in range(0, X.shape[0], EVAL_CHUNK):
                sl = slice(start, start + EVAL_CHUNK)
                outs.append(self.output(X[sl], None if f0_all is None else f0_all[sl]))
            return torch.cat(outs)
        finally:
            self.model.train(was_training)

    def test_loss(self) -> float:
        """The loss on the test set (``predict``: eval mode, no gradients)."""
        with torch.no_grad():
            return float(self.loss_fn(self.predict(self.X_te), self.y_te))


def to_device(X: torch.Tensor, y: torch.Tensor, device: torch.device, dtype: str):
    """Move a batch to the device; floating tensors take DTYPE, integer labels stay integers."""
    dt = getattr(torch, dtype)
    X = X.to(device, dt if X.is_floating_point() else X.dtype, non_blocking=True)
    y = y.to(device, dt if y.is_floating_point() else y.dtype, non_blocking=True)
    return X, y


def job_config(job: Job, spec: SweepSpec) -> dict[str, Any]:
    """What grabs, models and post_init_fn see: user keys, hyperparameters, iterator values."""
    return {**spec.user_config, **dataclasses.asdict(job.hp), **job.values}


def output_dim(y: torch.Tensor, d_out: int | None) -> tuple[int, bool]:
    """The model's output dimension and whether its (n, 1) output is squeezed to y's (n,)."""
    if not y.is_floating_point():
        if d_out is None:
            raise SweepError(
                "y holds integer class labels, so the output dimension cannot be "
                "read from it: set D_OUT (the number of classes) in global_config."
            )
        return d_out, False
    found = 1 if y.ndim == 1 else int(np.prod(y.shape[1:]))
    if d_out is not None and d_out != found:
        raise SweepError(
            f"D_OUT={d_out}, but the float targets have {found} outputs per sample (y has shape "
            f"{tuple(y.shape)}); set D_OUT={found}, or None to read it from the targets."
        )
    return found, y.ndim == 1


def model_spec(
    job: Job, config: Mapping[str, Any], in_shape: tuple[int, ...], d_out: int
) -> tuple[type[nn.Module], dict[str, Any]]:
    """The job's model class and its constructor arguments, matched by name."""
    hp = job.hp
    model_cls = resolve_model_class(hp.MODEL_CLASS)
    provided = standard_kwargs(in_shape, d_out, hp.WIDTH, hp.DEPTH, hp.NONLINEARITY, hp.BIAS)
    return model_cls, constructor_kwargs(model_cls, provided, config)


def training_rng_seed(job: Job) -> int:
    """The seed of torch's global RNG while the job trains (dropout, user code), in any engine."""
    return SubSeeds.of(job.seed).training_rng


@contextlib.contextmanager
def kept_global_rngs(device: torch.device) -> Iterator[None]:
    """Run a block, then give torch's (and the device's), numpy's and Python's global random
    generators back the states they had before it."""
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


@dataclass(frozen=True)
class GlobalRngs:
    """The states of torch's (CPU), numpy's and Python's global generators: what a stacked run
    keeps per job for a batch function that draws from them."""

    torch_state: torch.Tensor
    numpy_state: tuple
    python_state: tuple

    @classmethod
    def now(cls) -> GlobalRngs:
        return cls(torch.get_rng_state(), np.random.get_state(), random.getstate())

    def put(self) -> None:
        """Make these the global generators' states."""
        torch.set_rng_state(self.torch_state)
        np.random.set_state(self.numpy_state)
        random.setstate(self.python_state)

    def same_as(self, other: GlobalRngs) -> bool:
        a, b = self.numpy_state, other.numpy_state
        return (
            torch.equal(self.torch_state, other.torch_state)
            and self.python_state == other.python_state
            and np.array_equal(a[1], b[1])
            and a[:1] + a[2:] == b[:1] + b[2:]
        )


def seed_global_rngs(seed: int) -> None:
    """Seed torch's, numpy's and Python's global generators from one job sub-seed: user code
    (and ``modelscape.data``) may draw from any of them."""
    if torch.cuda.is_available() and not torch.cuda.is_initialized():
        torch.manual_seed(seed)  # also queues the CUDA generators' seed for their lazy init
    else:
        # what torch.manual_seed does, without the traceback it records for a lazy CUDA init
        # (~0.8 ms a call: a third of a tiny job's time in a 2,000-job sweep)
        torch.default_generator.manual_seed(seed)
        if torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
    random.seed(seed)


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with torch's, numpy's and Python's global generators seeded from ``seed``,
    restoring the caller's states after it."""
    with kept_global_rngs(device):
        seed_global_rngs(seed)
        yield


def setup_job(job: Job, spec: SweepSpec, device: torch.device) -> Problem:
    """Draw the job's data, build its model and optimizer, and cache what centering needs."""
    hp = job.hp
    seeds = SubSeeds.of(job.seed)
    config = job_config(job, spec)

    # A batch function may draw from the global RNG instead of `gen`; seed it per draw so that
    # the data still depend only on the job.
    if spec.X_te is not None:
        X_te, y_te = spec.X_te, spec.y_te
    else:
        gen_te = torch.Generator(device).manual_seed(seeds.test_data)
        with seeded_global_rng(seeds.test_draw_rng, device):
            draw = spec.make_batch_fn(
                bsz=hp.N_TEST, gen=gen_te, X=None, y=None, job_values=job.values
            )
            X_te, y_te = draw(0)
        check_batch(X_te, y_te, hp.N_TEST, "test set (batch_fn with bsz=N_TEST)")
    X_te, y_te = to_device(X_te, y_te, device, hp.DTYPE)
    check_finite(X_te, y_te, f"job ({job.label()}), the test set")

    gen_tr = torch.Generator(device).manual_seed(seeds.train_data)
    batch_fn = None
    X_tr = y_tr = None
    with seeded_global_rng(seeds.train_draw_rng, device):
        draw = spec.make_batch_fn(
            bsz=hp.N_SAMPLES, gen=gen_tr, X=None, y=None, job_values=job.values
        )
        if hp.ONLINE:
            batch_fn = draw
        else:
            X_tr, y_tr = draw(job.trial)
    if not hp.ONLINE:
        check_batch(X_tr, y_tr, hp.N_SAMPLES, f"training set (batch_fn({job.trial}))")
        X_tr, y_tr = to_device(X_tr, y_tr, device, hp.DTYPE)
        check_finite(X_tr, y_tr, f"job ({job.label()}), the training set")

    d_out, squeeze = output_dim(y_te, hp.D_OUT)
    model_cls, kwargs = model_spec(job, config, tuple(X_te.shape[1:]), d_out)
    opt_cls = resolve_class(hp.OPTIMIZER, torch.optim, "OPTIMIZER")
    opt_kwargs = optimizer_kwargs(opt_cls, job)
    gamma = hp.GAMMA
    # Model init uses the global RNG (nn.Module initializers); fork it so that a job's init
    # depends only on its seed, and build on the CPU so CPU and GPU runs start identically.
    with seeded_global_rng(seeds.model_init, torch.device("cpu")):
        model = model_cls(**kwargs).to(getattr(torch, hp.DTYPE))
        if device.type == "cpu" and getattr(model, "prefers_channels_last", False):
            # oneDNN's CPU convolutions run faster on channels-last weights and activations
            # (the activations follow the weights); the same model to float rounding
            model.to(memory_format=torch.channels_last)
        own = implementation_kwargs(opt_cls, opt_kwargs, model.parameters(), device)
        opt = parametrize.apply(
            model,
            hp.PARAMETRIZATION,
            opt_cls,
            hp.LR * parametrize.lr_gamma_factor(gamma),
            {**opt_kwargs, **own},
        )
        if spec.post_init_fn is not None:
            extra = accepted_kwargs(spec.post_init_fn, config)
            model, opt = spec.post_init_fn(model, opt, **extra)
    model.to(device)

    loss_fn = resolve_class(hp.LOSS, nn, "LOSS")()
    problem = Problem(
        job=job,
        device=device,
        model=model,
        opt=opt,
        loss_fn=loss_fn,
        gamma=gamma,
        X_te=X_te,
        y_te=y_te,
        f0_te=None,
        X_tr=X_tr,
        y_tr=y_tr,
        batch_fn=batch_fn,
        gen=gen_tr,
        squeeze=squeeze,
        config=config,
        grabs=spec.grabs,
        grab_shapes=spec.grab_shapes,
    )
    if hp.CENTER:
        # f_init is the initial network as a function: eval mode, so dropout does not make it
        # random
        model0 = copy.deepcopy(model).requires_grad_(False).eval()
        # seeded: a user model may still draw random numbers in eval mode
        with torch.no_grad(), seeded_global_rng(seeds.centering, device):
            problem.f0_te = _chunked(model0, X_te)
            if X_tr is not None:
                problem.f0_tr = model0(X_tr)
            if X_tr is None or spec.grabs:  # online batches, and predict() on a grab's inputs
                problem.model0 = model0
    return problem


def _chunked(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(X[i : i + EVAL_CHUNK]) for i in range(0, X.shape[0], EVAL_CHUNK)])


def evaluate_grabs(problem: Problem, X: torch.Tensor, y: torch.Tensor, step: int):
    """Call every grab with the documented keyword arguments; values become numpy arrays."""
    out = {}
    for name, fn in problem.grabs.items():
        value = fn(
            model=problem.model,
            X_tr=X,
            y_tr=y,
            X_te=problem.X_te,
            y_te=problem.y_te,
            opt=problem.opt,
            step=step,
            predict=problem.predict,
            **problem.config,
        )
        out[name] = to_numpy(value, name)
        check_grab_shape(name, out[name], problem.grab_shapes)
    return out


def to_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
        raise SweepError(
            f"grab {name!r} returned {type(value).__name__}; grabs return numbers or arrays."
        )
    return arr
