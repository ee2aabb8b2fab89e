"""How a job is trained: the reference training loop, one job at a time.

``setup_job`` turns a ``Job`` into a ``Problem`` (data, model, optimizer, centering caches);
``train`` runs the loop on it; ``run_job`` wraps both so that a failing job becomes a failed
record instead of an exception. ``train_group`` is what executors call: it trains a group of
jobs and yields one record per job.

Each step: draw the batch; forward, loss, backward, optimizer step; update the EMA of the train
loss (``ema = s*ema + (1-s)*loss``, starting at the first loss); record the first step whose EMA
is below each threshold; stop once all are crossed, or at MAX_ITER. Step numbers are 0-based: a
timekey of 0 means the first step's loss was already below the threshold.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

from modelscape import parametrize
from modelscape.checkpoint import Checkpoints
from modelscape.jobs import Job, SweepError, sub_seeds
from modelscape.models import constructor_kwargs, resolve_model_class, standard_kwargs
from modelscape.results import JobRecord
from modelscape.sweep import BatchFn, SweepSpec, accepted_kwargs, check_batch

EVAL_CHUNK = 8192  # rows per forward pass when evaluating the test set, to bound memory
# model init, training data, test data, the global RNG while training, centering offsets
# model init, train data, test data, global RNG while training, centering, global RNG while the
# test set and the training set are drawn (for batch functions that ignore `gen`)
N_SUB_SEEDS = 7


def lr_gamma_factor(gamma: float) -> float:
    """The seed's richness rule for the learning rate: GAMMA**2 below 1, GAMMA above."""
    return gamma**2 if gamma < 1 else gamma


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
    """A torch class given by name (``"SGD"``, ``"MSELoss"``) or as a class."""
    if isinstance(spec, type):
        return spec
    cls = getattr(module, spec, None)
    if not isinstance(cls, type):
        names = sorted(
            n for n in dir(module) if isinstance(getattr(module, n), type) and not n.startswith("_")
        )
        raise SweepError(
            f"{what}={spec!r} is not in {module.__name__}. Choices: {', '.join(names)}."
        )
    return cls


def optimizer_kwargs(opt_cls: type, job: Job, config: Mapping[str, Any]) -> dict[str, Any]:
    """The optimizer's extra arguments.

    ``momentum`` and ``weight_decay`` come from MOMENTUM and WEIGHT_DECAY; any other argument
    (``betas``, ``eps``, ``nesterov``...) from a user key or iterator value of exactly its name.
    """
    params = inspect.signature(opt_cls.__init__).parameters
    if job.hp.MOMENTUM and "momentum" not in params:
        raise SweepError(
            f"MOMENTUM={job.hp.MOMENTUM} but {opt_cls.__name__} takes no momentum "
            "argument; set MOMENTUM=0 or use betas for Adam."
        )
    from_hp = {"momentum": job.hp.MOMENTUM, "weight_decay": job.hp.WEIGHT_DECAY}
    kwargs = {}
    for name in params:
        if name in ("self", "params", "lr"):
            continue
        if name in config:
            kwargs[name] = config[name]
        elif name in from_hp:
            kwargs[name] = from_hp[name]
    return kwargs


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

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The training batch for ``step`` and its centering offset."""
        if self.batch_fn is None:
            return self.X_tr, self.y_tr, self.f0_tr  # type: ignore[return-value]
        X, y = self.batch_fn(step)
        if step == 0:
            check_batch(X, y, self.job.hp.N_SAMPLES, "batch_fn(0)")
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
        out = out / self.gamma
        return out.squeeze(-1) if self.squeeze else out

    @torch.no_grad()
    def test_loss(self) -> float:
        """The loss on the test set, in eval mode (no dropout), the model's mode restored."""
        was_training = self.model.training
        self.model.eval()
        try:
            outs = []
            for start in range(0, self.X_te.shape[0], EVAL_CHUNK):
                sl = slice(start, start + EVAL_CHUNK)
                f0 = None if self.f0_te is None else self.f0_te[sl]
                outs.append(self.output(self.X_te[sl], f0))
            return float(self.loss_fn(torch.cat(outs), self.y_te))
        finally:
            self.model.train(was_training)


def to_device(X: torch.Tensor, y: torch.Tensor, device: torch.device, dtype: str):
    """Move a batch to the device; floating tensors take DTYPE, integer labels stay integers."""
    dt = getattr(torch, dtype)
    X = X.to(device, dt if X.is_floating_point() else X.dtype, non_blocking=True)
    y = y.to(device, dt if y.is_floating_point() else y.dtype, non_blocking=True)
    return X, y


def job_config(job: Job, spec: SweepSpec) -> dict[str, Any]:
    """What grabs, models and post_init_fn see: user keys, hyperparameters, iterator values."""
    return {**spec.user_config, **dataclasses.asdict(job.hp), **job.values}


def _output_dim(y: torch.Tensor, config: Mapping[str, Any]) -> tuple[int, bool]:
    if not y.is_floating_point():
        d_out = config.get("d_out", config.get("D_OUT"))
        if d_out is None:
            raise SweepError(
                "y holds integer class labels, so the output dimension cannot be "
                "read from it: set D_OUT (the number of classes) in global_config."
            )
        return int(d_out), False
    if y.ndim == 1:
        return 1, True
    return int(np.prod(y.shape[1:])), False


def model_spec(
    job: Job, config: Mapping[str, Any], in_shape: tuple[int, ...], d_out: int
) -> tuple[type[nn.Module], dict[str, Any]]:
    """The job's model class and its constructor arguments, matched by name."""
    hp = job.hp
    model_cls = resolve_model_class(hp.MODEL_CLASS)
    provided = standard_kwargs(in_shape, d_out, hp.WIDTH, hp.DEPTH, hp.NONLINEARITY, hp.BIAS)
    return model_cls, constructor_kwargs(model_cls, provided, config)


def check_model(job: Job, spec: SweepSpec, X: torch.Tensor, y: torch.Tensor) -> None:
    """Before training: the model can be built and its parametrization applies.

    The model is built on the meta device (no memory, no random numbers). A constructor that
    cannot run there is left for the job itself to report.
    """
    config = job_config(job, spec)
    model_cls, kwargs = model_spec(job, config, tuple(X.shape[1:]), _output_dim(y, config)[0])
    opt_cls = resolve_class(job.hp.OPTIMIZER, torch.optim, "OPTIMIZER")
    optimizer_kwargs(opt_cls, job, config)
    resolve_class(job.hp.LOSS, nn, "LOSS")
    if job.hp.PARAMETRIZATION == "sp":
        return
    try:
        with torch.device("meta"):
            model = model_cls(**kwargs)
    except Exception:  # noqa: BLE001 - the job reports a real construction error itself
        return
    try:
        parametrize.check_applicable(model, job.hp.PARAMETRIZATION, opt_cls)
    except parametrize.ParametrizationError as err:
        raise SweepError(f"job ({job.label()}): {err}") from None


def training_rng_seed(job: Job) -> int:
    """The seed of torch's global RNG while the job trains (dropout, user code), in any engine."""
    return sub_seeds(job.seed, N_SUB_SEEDS)[3]


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with torch's global RNG seeded to ``seed``, restoring the caller's state."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def setup_job(job: Job, spec: SweepSpec, device: torch.device) -> Problem:
    """Draw the job's data, build its model and optimizer, and cache what centering needs."""
    hp = job.hp
    seeds = sub_seeds(job.seed, N_SUB_SEEDS)
    init_seed, train_seed, test_seed, center_seed = seeds[0], seeds[1], seeds[2], seeds[4]
    config = job_config(job, spec)

    # A batch function may draw from the global RNG instead of `gen`; seed it per draw so that
    # the data still depend only on the job.
    if spec.X_te is not None:
        X_te, y_te = spec.X_te, spec.y_te
    else:
        gen_te = torch.Generator(device).manual_seed(test_seed)
        with seeded_global_rng(seeds[5], device):
            draw = spec.make_batch_fn(
                bsz=hp.N_TEST, gen=gen_te, X=None, y=None, job_values=job.values
            )
            X_te, y_te = draw(0)
        check_batch(X_te, y_te, hp.N_TEST, "test set (batch_fn with bsz=N_TEST)")
    X_te, y_te = to_device(X_te, y_te, device, hp.DTYPE)

    gen_tr = torch.Generator(device).manual_seed(train_seed)
    batch_fn = None
    X_tr = y_tr = None
    with seeded_global_rng(seeds[6], device):
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

    d_out, squeeze = _output_dim(y_te, config)
    model_cls, kwargs = model_spec(job, config, tuple(X_te.shape[1:]), d_out)
    opt_cls = resolve_class(hp.OPTIMIZER, torch.optim, "OPTIMIZER")
    opt_kwargs = optimizer_kwargs(opt_cls, job, config)
    gamma = hp.GAMMA
    # Model init uses the global RNG (nn.Module initializers); fork it so that a job's init
    # depends only on its seed, and build on the CPU so CPU and GPU runs start identically.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = model_cls(**kwargs).to(getattr(torch, hp.DTYPE))
        opt = parametrize.apply(
            model, hp.PARAMETRIZATION, opt_cls, hp.LR * lr_gamma_factor(gamma), opt_kwargs
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
    )
    if hp.CENTER:
        # f_init is the initial network as a function: eval mode, so dropout does not make it
        # random
        model0 = copy.deepcopy(model).requires_grad_(False).eval()
        devices = [device] if device.type == "cuda" else []
        # seeded: a user model may still draw random numbers in eval mode
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(center_seed)
            problem.f0_te = _chunked(model0, X_te)
            if X_tr is not None:
                problem.f0_tr = model0(X_tr)
            else:
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
            **problem.config,
        )
        out[name] = to_numpy(value, name)
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


class Curves:
    """Per-step curves for ONLYTHRESHOLDS=False: EMA every step, tests and grabs on a cadence."""

    def __init__(self, max_iter: int):
        self.train = np.full(max_iter, np.nan)
        self.evals: dict[str, list[tuple[int, np.ndarray]]] = {}

    def state(self) -> dict[str, Any]:
        return {"train": self.train.copy(), "evals": copy.deepcopy(self.evals)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.train = state["train"].copy()
        self.evals = copy.deepcopy(state["evals"])

    def add_eval(self, step: int, values: Mapping[str, Any]) -> None:
        for k, v in values.items():
            self.evals.setdefault(k, []).append((step, np.asarray(v)))

    def finish(self, last_step: int, diverged: bool) -> dict[str, np.ndarray]:
        n = self.train.shape[0]
        # a job that diverged at its first step was never evaluated: its test curve is all NaN
        out = {"train_loss": self.train.copy(), "test_loss": np.full(n, np.nan)}
        if not diverged:
            out["train_loss"][last_step + 1 :] = self.train[last_step]
        for k, points in self.evals.items():
            arr = np.full((n,) + points[0][1].shape, np.nan)
            for (s, v), nxt in zip(points, points[1:] + [(None, None)]):
                end = nxt[0] if nxt[0] is not None else (last_step + 1 if diverged else n)
                arr[s:end] = v
            out[k] = arr
        return out


def train(problem: Problem, checkpoints: Checkpoints | None = None) -> JobRecord:
    """Run the training loop of one job to its thresholds or MAX_ITER.

    With ``checkpoints``, the job's state is saved every CHECKPOINT_EVERY seconds, and a job
    with a saved state continues from it: the result is bit-identical (on CPU) to a run that
    was never interrupted, provided the batch function depends only on ``gen`` and ``step``.
    """
    job = problem.job
    devices = [problem.device] if problem.device.type == "cuda" else []
    # The global RNG (dropout, user code) is seeded per job, so it does not depend on placement.
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(training_rng_seed(job))
        return _train_loop(problem, checkpoints)


def _train_loop(problem: Problem, checkpoints: Checkpoints | None) -> JobRecord:
    hp = problem.job.hp
    start = time.perf_counter()
    thresholds = sorted(hp.LOSS_CHECKPOINTS, reverse=True)
    loop = LoopState(
        timekeys=np.full(len(thresholds), np.nan),
        curves=None if hp.ONLYTHRESHOLDS else Curves(hp.MAX_ITER),
    )
    if checkpoints is not None:
        saved = checkpoints.load(problem.job.key)
        if saved is not None and saved["seed"] == problem.job.seed:
            loop = restore_state(problem, saved)
            _say(
                f"modelscape: resuming job ({problem.job.label()}) from its checkpoint "
                f"at step {loop.step}",
                file=sys.stderr,
            )
        checkpoints.reset_clock()
    s = hp.EMA_SMOOTHER
    ema, timekeys, curves = loop.ema, loop.timekeys, loop.curves
    diverged = False
    step = loop.step
    X = y = None
    model, opt, loss_fn = problem.model, problem.opt, problem.loss_fn
    crossed = int(np.count_nonzero(~np.isnan(timekeys)))
    model.train()
    for step in range(loop.step + 1, hp.MAX_ITER):
        X, y, f0 = problem.batch(step)
        loss = loss_fn(problem.output(X, f0), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()  # the reference loop syncs each step; the batched engine does not
        if not math.isfinite(value):
            diverged = True
            break
        ema = value if step == 0 else s * ema + (1 - s) * value
        # thresholds descend, so they are crossed in order: only the next one needs a look
        while crossed < len(thresholds) and ema < thresholds[crossed]:
            timekeys[crossed] = step
            crossed += 1
        done = crossed == len(thresholds)
        if curves is not None:
            curves.train[step] = ema
            if step % hp.EVAL_EVERY == 0 or done or step == hp.MAX_ITER - 1:
                values = {"test_loss": problem.test_loss(), **evaluate_grabs(problem, X, y, step)}
                curves.add_eval(step, values)
        if hp.VERBOSE and step % hp.EVAL_EVERY == 0:
            _say(f"[{problem.job.label()}] step {step}: train loss {value:.4g} (ema {ema:.4g})")
        if done:
            break
        if checkpoints is not None and step < hp.MAX_ITER - 1 and checkpoints.due():
            elapsed = loop.seconds + time.perf_counter() - start
            state = LoopState(step, ema, timekeys, curves, elapsed)
            checkpoints.save(problem.job.key, snapshot(problem, state))
    record = JobRecord(
        key=problem.job.key,
        seed=problem.job.seed,
        status="diverged" if diverged else "ok",
        timekeys=timekeys,
        steps=step + 1,
        device=str(problem.device),
    )
    if diverged:
        if curves is not None:
            record.curves = curves.finish(step - 1, diverged=True)
    else:
        record.train_loss = ema
        record.test_loss = problem.test_loss()
        record.grabs = evaluate_grabs(problem, X, y, step) if problem.grabs else {}
        if curves is not None:
            record.curves = curves.finish(step, diverged=False)
    record.seconds = loop.seconds + time.perf_counter() - start
    return record


@dataclass
class LoopState:
    """Where the training loop stands after ``step`` (-1: before the first step)."""

    step: int = -1
    ema: float = math.nan
    timekeys: np.ndarray = field(default_factory=lambda: np.zeros(0))
    curves: Curves | None = None
    seconds: float = 0.0


def snapshot(problem: Problem, loop: LoopState) -> dict[str, Any]:
    """Everything needed to continue the job bit-identically from after ``loop.step``."""
    state: dict[str, Any] = {
        "seed": problem.job.seed,
        "step": loop.step,
        "ema": loop.ema,
        "timekeys": loop.timekeys.copy(),
        "curves": None if loop.curves is None else loop.curves.state(),
        "seconds": loop.seconds,
        "model": problem.model.state_dict(),
        "opt": problem.opt.state_dict(),
        "gen": None if problem.gen is None else problem.gen.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    if problem.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(problem.device)
    return state


def restore_state(problem: Problem, state: Mapping[str, Any]) -> LoopState:
    """Load a ``snapshot`` into a freshly set-up ``problem``; returns where the loop stood."""
    problem.model.load_state_dict(state["model"])
    problem.opt.load_state_dict(state["opt"])
    if problem.gen is not None:
        problem.gen.set_state(state["gen"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], problem.device)
    curves = None
    if state["curves"] is not None:
        curves = Curves(problem.job.hp.MAX_ITER)
        curves.load_state(state["curves"])
    return LoopState(
        state["step"], state["ema"], state["timekeys"].copy(), curves, state["seconds"]
    )


def _say(text: str, file: TextIO | None = None) -> None:
    from tqdm import tqdm

    tqdm.write(text, file=file)


def failed_record(job: Job, err: BaseException, device: torch.device | str) -> JobRecord:
    """The record of a job that raised: its message and traceback, nothing else."""
    return JobRecord(
        key=job.key,
        seed=job.seed,
        status="failed",
        device=str(device),
        timekeys=np.full(len(job.hp.LOSS_CHECKPOINTS), np.nan),
        error=f"{type(err).__name__}: {err}",
        traceback="".join(traceback.format_exception(err)),
    )


def run_job(
    job: Job, spec: SweepSpec, device: torch.device, checkpoints: Checkpoints | None = None
) -> JobRecord:
    """Set up and train one job; an exception becomes a failed record."""
    try:
        return train(setup_job(job, spec, device), checkpoints)
    except Exception as err:  # noqa: BLE001 - isolation: one job never sinks the sweep
        return failed_record(job, err, device)


def train_group(
    jobs: Sequence[Job],
    spec: SweepSpec,
    device: torch.device,
    checkpoints: Checkpoints | None = None,
) -> Iterator[JobRecord]:
    """Train a group of jobs on one device, yielding each job's record as it finishes.

    A group the batched engine can stack trains as one model (a job's numbers then do not
    depend on which other jobs share its group); otherwise, and alone, jobs train one by one.
    With DETERMINISTIC=True, PyTorch's deterministic algorithms are on while the group trains
    (ops without a deterministic version warn instead of failing).
    """
    from modelscape import batched

    with deterministic_algorithms(jobs[0].hp.DETERMINISTIC):
        if batched.can_batch(jobs, spec):
            yield from batched.train_batched(jobs, spec, device, checkpoints)
            return
        for job in jobs:
            yield run_job(job, spec, device, checkpoints)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` for a window, restoring the caller's setting."""
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    before_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    # cuBLAS is deterministic only with a fixed workspace; this must be set before CUDA starts
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn_only)
