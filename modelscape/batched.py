"""How compatible jobs train together as one stacked model.

Jobs that share their shapes (model, width, depth, sample count, dtype, optimizer class...) and
differ only in seed, trial, LR, GAMMA, momentum, weight decay, EMA constant, thresholds or
MAX_ITER train as one model whose parameters carry a leading job dimension. Each job is still
built by ``engine.setup_job``, so its data and initial weights are exactly those of the one-job
loop; the stacked run reproduces ``engine.train`` up to float rounding (timekeys exactly).

- The built-in ``MLP`` (PARAMETRIZATION sp, MSE loss) trains with hand-written batched matmuls
  and a hand-written backward pass; any other model runs through ``torch.func`` (``vmap`` over
  ``functional_call``) with autograd.
- SGD (momentum, dampening, Nesterov, weight decay), Adam and AdamW run functionally on the
  stacked parameters; each job's per-layer LR, momentum, betas, eps and weight decay are read
  from its own torch optimizer's param groups, so parametrizations carry over unchanged.
- Losses stay on the device. Every ``SYNC_EVERY`` steps (and at evaluation steps) they are
  copied to the host in one transfer, where the EMA, timekeys and exits are computed exactly as
  the one-job loop does. A job that exits inside such a window is replayed from the window's
  start on its own, so its final parameters are those of its exit step; the others carry on,
  and the exited job's rows leave the stack.
- The test loss and grabs run on the job's own module (its ``Problem.model``, with the stacked
  values copied in) only where they are recorded.

``group_jobs`` forms the groups (capped by ``GROUP_BYTES``, see ``group_cap``); ``can_batch``
says whether a group can train this way; ``train_batched`` trains it. A group that cannot be
stacked trains one job at a time, with a one-line notice (BATCHED="auto"), or raises
(BATCHED="on").
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from modelscape import engine
from modelscape import hparams as H
from modelscape.checkpoint import Checkpoints
from modelscape.jobs import Job, SweepError
from modelscape.models import MLP
from modelscape.results import JobRecord
from modelscape.sweep import SweepSpec, check_batch

SYNC_EVERY = 32  # steps between copies of the loss buffer to the host (the only host sync)
GROUP_BYTES = 2 * 2**30  # rough memory budget of one group's stacked tensors
MAX_GROUP = 256  # jobs per group at most, whatever the budget says

# Hyperparameters that may differ between the jobs of one group; every other job-scoped one is
# part of the group's shape and must be equal.
PER_JOB = frozenset(
    {
        "LR",
        "GAMMA",
        "SEED",
        "MOMENTUM",
        "WEIGHT_DECAY",
        "EMA_SMOOTHER",
        "LOSS_CHECKPOINTS",
        "MAX_ITER",
        "NUM_TRIALS",
    }
)
SAME_IN_GROUP = tuple(n for n in H.JOB_FIELDS if n not in PER_JOB) + H.SWEEP_FIELDS
OPTIMIZERS = ("SGD", "Adam", "AdamW")

_ACT_FROM_OUTPUT = {nn.ReLU, nn.Tanh, nn.Identity}  # backward needs only the activation's output
_ACT_FROM_INPUT = {nn.GELU, nn.SiLU}  # backward needs the pre-activation
# Modules whose training step is random or updates buffers: replaying a window from a snapshot of
# the parameters would not reproduce them, so their models train one job at a time.
STATEFUL_MODULES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
_NOTICED: set[str] = set()
BUFFER = "buffer:"  # prefix of a module buffer's name in Stack.data


class Unbatchable(Exception):
    """This group cannot train as one stacked model; the message says why."""


# ----------------------------------------------------------------------------- grouping


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def group_key(job: Job) -> tuple:
    """What must be equal for two jobs to share a stacked model."""
    return tuple((n, _hashable(getattr(job.hp, n))) for n in SAME_IN_GROUP)


def job_bytes(job: Job) -> int:
    """A rough size of one job's share of a group: weights with gradients, optimizer state and a
    snapshot, plus the activations of one step (WIDTH stands in for the input dimension)."""
    hp = job.hp
    itemsize = 8 if hp.DTYPE == "float64" else 4
    weights = hp.WIDTH * hp.WIDTH * hp.DEPTH + 2 * hp.WIDTH
    activations = hp.N_SAMPLES * hp.WIDTH * (2 * hp.DEPTH + 2)
    return itemsize * (6 * weights + 2 * activations)


def group_cap(job: Job) -> int:
    """The most jobs ``group_jobs`` puts in this job's group (``MAX_GROUP``, ``GROUP_BYTES``).

    A function of the job's shape hyperparameters only, so the same in every run and for every
    job of a group. A job whose cap is 1 always trains alone, which lets its stack skip the
    pairing that keeps a one-job stack's numbers equal to those of a larger one (``_bmm``).
    """
    return max(1, min(MAX_GROUP, GROUP_BYTES // max(1, job_bytes(job))))


def group_jobs(jobs: Sequence[Job]) -> list[list[Job]]:
    """Split jobs into groups that can train as one stacked model, in first-seen order.

    Jobs with the same ``group_key`` share a group, up to ``MAX_GROUP`` jobs and ``GROUP_BYTES``
    of estimated memory; a job whose optimizer cannot be stacked stays alone.
    """
    buckets: dict[tuple, list[list[Job]]] = {}
    order: list[list[Job]] = []
    for job in jobs:
        name = _optimizer_name(job)
        if name not in OPTIMIZERS:
            _fall_back(job, f"OPTIMIZER={name!r} has no stacked version ({', '.join(OPTIMIZERS)})")
            order.append([job])
            continue
        cap = group_cap(job)
        groups = buckets.setdefault(group_key(job), [])
        if not groups or len(groups[-1]) >= cap:
            groups.append([])
            order.append(groups[-1])
        groups[-1].append(job)
    return order


def _optimizer_name(job: Job) -> str:
    opt = job.hp.OPTIMIZER
    return opt.__name__ if isinstance(opt, type) and opt.__module__.startswith("torch") else opt


def can_batch(jobs: Sequence[Job], spec: SweepSpec) -> bool:
    """True when this group can be trained by ``train_batched`` (checked from the jobs alone;
    what only the built models reveal is checked in ``train_batched``, which falls back)."""
    # a job alone trains in the one-job loop: stacking one job would cost it a second copy
    if len(jobs) < 2 or jobs[0].hp.BATCHED == "off":
        return False
    reason = None
    name = _optimizer_name(jobs[0])
    if name not in OPTIMIZERS:
        reason = f"OPTIMIZER={name!r} has no stacked version ({', '.join(OPTIMIZERS)})"
    else:
        key = group_key(jobs[0])
        for job in jobs[1:]:
            other = group_key(job)
            if other != key:
                names = [a[0] for a, b in zip(key, other) if a != b]
                reason = f"jobs differ in {', '.join(names)}"
                break
    if reason is None:
        return True
    _fall_back(jobs[0], reason)
    return False


def _fall_back(job: Job, reason: str) -> None:
    """BATCHED="on" refuses to fall back; "auto" says so once per reason."""
    if job.hp.BATCHED == "on":
        raise SweepError(
            f"BATCHED='on' but these jobs cannot train as one stacked model: {reason}. "
            "Use BATCHED='auto' to train them one at a time."
        )
    if reason not in _NOTICED:
        _NOTICED.add(reason)
        print(f"modelscape: training jobs one at a time: {reason}.", file=sys.stderr)


# ----------------------------------------------------------------------------- stacked state


@dataclass
class Stack:
    """The running jobs' tensors, stacked on a leading job dimension (row ``r`` = ``rows[r]``).

    ``params`` and ``slots`` (optimizer state) change every step; ``hyper`` (per-parameter
    optimizer settings, shaped to broadcast against the parameter) and ``data`` do not.
    """

    rows: list[int]
    params: list[torch.Tensor]
    slots: dict[str, list[torch.Tensor]]
    hyper: dict[str, list[torch.Tensor]]
    data: dict[str, torch.Tensor | None]
    init: list[torch.Tensor] | None = None  # online centering: the initial parameters

    def take(self, keep: Sequence[int]) -> Stack:
        """The stack of rows ``keep`` (positions in this stack)."""
        device = self.params[0].device
        idx = torch.tensor(list(keep), dtype=torch.long, device=device)

        def sel(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.index_select(0, idx) for t in ts]

        return Stack(
            rows=[self.rows[k] for k in keep],
            params=sel(self.params),
            slots={k: sel(v) for k, v in self.slots.items()},
            hyper={k: sel(v) for k, v in self.hyper.items()},
            data={k: None if v is None else v.index_select(0, idx) for k, v in self.data.items()},
            init=None if self.init is None else sel(self.init),
        )

    def mutable(self) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
        return [p.clone() for p in self.params], {
            k: [t.clone() for t in v] for k, v in self.slots.items()
        }


# ----------------------------------------------------------------------------- model kernels


def _bmm(a: torch.Tensor, b: torch.Tensor, pair: bool) -> torch.Tensor:
    """``torch.bmm`` whose result for a job does not depend on how many jobs are stacked.

    With a single job torch computes the product on another path (``mm``/``gemv``), whose
    rounding differs; computing a stack of one as a (broadcast) pair keeps every job's numbers
    the same in any group, so results do not depend on workers, placement or resumption. The
    pair costs twice the work, so it is made only when ``pair`` (``pair_singletons``: the job
    could share a stack, ``group_cap`` >= 2); a job that always trains alone is computed as
    the plain stack of one it always is.
    """
    if pair and a.shape[0] == 1:
        return torch.bmm(a.expand(2, -1, -1), b.expand(2, -1, -1))[:1]
    return torch.bmm(a, b)


def _baddbmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, pair: bool) -> torch.Tensor:
    """``torch.baddbmm`` with the same stack-size independence as ``_bmm``."""
    if pair and a.shape[0] == 1:
        out = torch.baddbmm(bias.expand(2, -1, -1), a.expand(2, -1, -1), b.expand(2, -1, -1))
        return out[:1]
    return torch.baddbmm(bias, a, b)


class MLPKernel:
    """The built-in MLP with MSE loss as batched matmuls, with its backward pass written out.

    Autograd is skipped because, for small models, its bookkeeping costs more than the math.
    ``pair_singletons``: compute a stack of one job as a broadcast pair (see ``_bmm``).
    """

    def __init__(self, model: MLP, names: list[str], pair_singletons: bool):
        self.pair = pair_singletons
        self.act = type(model.nonlin)
        self.approximate = model.nonlin.approximate if isinstance(model.nonlin, nn.GELU) else "none"
        index = {n: i for i, n in enumerate(names)}
        hidden = ["input_layer"] + [f"hidden_layers.{k}" for k in range(len(model.hidden_layers))]
        self.layers = [(index[f"{h}.weight"], index.get(f"{h}.bias")) for h in hidden]
        self.readout = (index["output_layer.weight"], index.get("output_layer.bias"))

    @staticmethod
    def check(problem: engine.Problem, parametrization: str) -> bool:
        """Whether this kernel computes exactly what the job's model and loss do."""
        model, loss_fn = problem.model, problem.loss_fn
        return (
            type(model) is MLP
            and problem.y_te.is_floating_point()
            and problem.y_te.dim() <= 2
            and parametrization == "sp"
            and type(loss_fn) is nn.MSELoss
            and loss_fn.reduction == "mean"
            and type(model.nonlin) in _ACT_FROM_OUTPUT | _ACT_FROM_INPUT
            and all(
                type(m) is nn.Linear
                for m in [model.input_layer, *model.hidden_layers, model.output_layer]
            )
            and not _has_hooks(model)
        )

    def _forward(self, params: list[torch.Tensor], X: torch.Tensor, keep: bool):
        h = X.reshape(X.shape[0], X.shape[1], -1)
        saved = [h]
        for wi, bi in self.layers:
            W = params[wi]
            z = (
                _bmm(h, W.mT, self.pair)
                if bi is None
                else _baddbmm(params[bi][:, None], h, W.mT, self.pair)
            )
            if self.act in _ACT_FROM_INPUT:
                saved.append(z)
                if self.act is nn.GELU:
                    h = nn.functional.gelu(z, approximate=self.approximate)
                else:
                    h = nn.functional.silu(z)
            elif self.act is nn.ReLU:
                h = z.relu_()
            elif self.act is nn.Tanh:
                h = z.tanh_()
            else:
                h = z
            saved.append(h)
        wi, bi = self.readout
        W = params[wi]
        f = (
            _bmm(h, W.mT, self.pair)
            if bi is None
            else _baddbmm(params[bi][:, None], h, W.mT, self.pair)
        )
        return f, (saved if keep else None)

    def forward(self, stack: Stack, params: list[torch.Tensor], X: torch.Tensor) -> torch.Tensor:
        return self._forward(params, X, keep=False)[0]

    def loss_and_grads(
        self, stack: Stack, X: torch.Tensor, y: torch.Tensor, f0: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Per-job losses [jobs] and the gradients of each job's loss for its parameters."""
        params = stack.params
        f, saved = self._forward(params, X, keep=True)
        gamma = stack.data["gamma_b"]
        out = f if f0 is None else f - f0
        if gamma is not None:
            out = out / gamma
        r = out - y.reshape(f.shape)
        losses = r.square().mean((1, 2))
        g = r * (2.0 / (r.shape[1] * r.shape[2]))
        if gamma is not None:
            g = g / gamma
        grads: list[torch.Tensor | None] = [None] * len(params)
        wi, bi = self.readout
        W, h = params[wi], saved[-1]
        grads[wi] = _bmm(g.mT, h, self.pair)
        # an outer product (one output) is faster as a broadcast multiply than as a bmm
        gh = g * W if W.shape[1] == 1 else _bmm(g, W, self.pair)
        if bi is not None:
            grads[bi] = g.sum(1)
        for k in range(len(self.layers) - 1, -1, -1):
            wi, bi = self.layers[k]
            h_out = saved.pop()  # this layer's output; below it, its input (and pre-activation)
            if self.act is nn.GELU:
                gz = torch.ops.aten.gelu_backward(gh, saved.pop(), approximate=self.approximate)
            elif self.act is nn.SiLU:
                gz = torch.ops.aten.silu_backward(gh, saved.pop())
            elif self.act is nn.ReLU:
                gz = torch.ops.aten.threshold_backward(gh, h_out, 0)
            elif self.act is nn.Tanh:
                gz = torch.ops.aten.tanh_backward(gh, h_out)
            else:
                gz = gh
            h_in = saved[-1]
            grads[wi] = _bmm(gz.mT, h_in, self.pair)
            if bi is not None:
                grads[bi] = gz.sum(1)
            if k > 0:
                gh = _bmm(gz, params[wi], self.pair)
        return losses, grads


class FuncKernel:
    """Any model: ``vmap`` over ``torch.func.functional_call``, gradients by autograd.

    ``pair_singletons``: compute a stack of one job as a broadcast pair (see ``_as_pair``).
    """

    def __init__(self, problems: list[engine.Problem], names: list[str], pair_singletons: bool):
        self.pair = pair_singletons
        p0 = problems[0]
        self.module = copy.deepcopy(p0.model).train()
        self.names = names
        self.loss_fn = p0.loss_fn
        self.squeeze = p0.squeeze
        self.buffer_names = [n for n, _ in p0.model.named_buffers()]

    def stacked_buffers(self, problems: list[engine.Problem]) -> dict[str, torch.Tensor]:
        """The jobs' buffers (e.g. parametrization multipliers), for ``Stack.data``."""
        return {
            BUFFER + n: torch.stack([dict(p.model.named_buffers())[n] for p in problems])
            for n in self.buffer_names
        }

    def _buffers(self, stack: Stack) -> dict[str, torch.Tensor]:
        return {n: stack.data[BUFFER + n] for n in self.buffer_names}

    def _apply(self, params, buffers, x):
        mapping = (dict(zip(self.names, params)), buffers)
        return torch.func.functional_call(self.module, mapping, (x,))

    def forward(self, stack: Stack, params: list[torch.Tensor], X: torch.Tensor) -> torch.Tensor:
        n = X.shape[0]
        args = _as_pair((tuple(params), self._buffers(stack), X), n, self.pair)
        return torch.func.vmap(self._apply)(*args)[:n]

    def loss_and_grads(
        self, stack: Stack, X: torch.Tensor, y: torch.Tensor, f0: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Per-job losses [jobs] and the gradients of each job's loss for its parameters."""
        leaves = [p.detach().requires_grad_(True) for p in stack.params]

        def one(params, buffers, x, yy, f0j, gamma):
            out = self._apply(params, buffers, x)
            if f0j is not None:
                out = out - f0j
            out = out / gamma
            if self.squeeze:
                out = out.squeeze(-1)
            return self.loss_fn(out, yy)

        in_dims = (0, 0, 0, 0, None if f0 is None else 0, 0)
        n = X.shape[0]
        data = (tuple(leaves), self._buffers(stack), X, y, f0, stack.data["gamma"])
        args = _as_pair(data, n, self.pair)
        losses = torch.func.vmap(one, in_dims=in_dims)(*args)[:n]
        grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
        if any(g is None for g in grads):
            # torch optimizers skip a parameter without a gradient; the stacked ones cannot
            raise RuntimeError("a parameter of the model gets no gradient")
        return losses.detach(), list(grads)


def _as_pair(tree: Any, n_jobs: int, pair: bool) -> Any:
    """With ``pair``, a stack of one job as a broadcast pair (see ``_bmm``); other stacks, and
    every stack without ``pair``, unchanged. Only the first copy's outputs are used, so the
    second adds exactly zero to every gradient."""
    if n_jobs != 1 or not pair:
        return tree
    if isinstance(tree, torch.Tensor):
        return tree.expand(2, *tree.shape[1:])
    if isinstance(tree, dict):
        return {k: _as_pair(v, n_jobs, pair) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(_as_pair(v, n_jobs, pair) for v in tree)
    return tree  # None


def _has_hooks(model: nn.Module) -> bool:
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules()
    )


# ----------------------------------------------------------------------------- optimizers


def _group_of(opt: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    return {id(p): g for g in opt.param_groups for p in g["params"]}


def _read_optimizers(problems: list[engine.Problem], names: list[str]):
    """Per-parameter, per-job settings from each job's torch optimizer.

    Returns (kind, trained flags, settings {name: [[value per job] per parameter]}, flags).
    """
    cls = type(problems[0].opt)
    if cls not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        raise Unbatchable(f"optimizer {cls.__name__} has no stacked version")
    kind = "sgd" if cls is torch.optim.SGD else "adam"
    keys = (
        ("lr", "momentum", "dampening", "weight_decay")
        if kind == "sgd"
        else ("lr", "beta1", "beta2", "eps", "weight_decay")
    )
    settings: dict[str, list[list[float]]] = {k: [[] for _ in names] for k in keys}
    trained: list[bool] | None = None
    flags: set[tuple] = set()
    for p in problems:
        if type(p.opt) is not cls:
            raise Unbatchable("the jobs' optimizers are of different classes")
        groups = _group_of(p.opt)
        params = dict(p.model.named_parameters())
        mine = [id(params[n]) in groups and params[n].requires_grad for n in names]
        if trained is None:
            trained = mine
        elif mine != trained:
            raise Unbatchable("the jobs' optimizers train different parameters")
        for i, n in enumerate(names):
            g = groups.get(id(params[n]))
            if g is None:
                continue
            if g.get("maximize") or g.get("differentiable") or g.get("amsgrad"):
                raise Unbatchable("maximize, differentiable and amsgrad have no stacked version")
            if kind == "sgd":
                values = (g["lr"], g["momentum"], g["dampening"], g["weight_decay"])
                flags.add(("nesterov", bool(g["nesterov"])))
            else:
                values = (g["lr"], *g["betas"], g["eps"], g["weight_decay"])
                decoupled = cls is torch.optim.AdamW or bool(g.get("decoupled_weight_decay"))
                flags.add(("decoupled", decoupled))
            for k, v in zip(keys, values):
                settings[k][i].append(float(v))
    if len(flags) > 1:
        raise Unbatchable(f"the jobs' optimizers differ in {sorted(flags)}")
    return kind, trained, settings, dict(flags)


class FunctionalOptimizer:
    """SGD or Adam/AdamW applied to stacked parameters, one set of settings per job."""

    def __init__(self, kind: str, trained: list[bool], settings, flags):
        self.kind = kind
        self.trained = [i for i, t in enumerate(trained) if t]
        self.flags = flags
        flat = {k: [v for per_param in vs for v in per_param] for k, vs in settings.items()}
        self.has_wd = any(flat["weight_decay"])
        self.has_momentum = kind == "sgd" and any(flat["momentum"])
        self._cache: tuple | None = None

    def build(self, settings, like: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """The settings as tensors that broadcast against each stacked parameter."""

        def as_tensor(values: list[float], p: torch.Tensor, dtype=None) -> torch.Tensor:
            t = torch.tensor(values, dtype=dtype or p.dtype, device=p.device)
            return t.view(-1, *([1] * (p.dim() - 1)))

        hyper: dict[str, list[torch.Tensor]] = {}
        for k, per_param in settings.items():
            hyper[k] = [
                as_tensor(per_param[i] if per_param[i] else [0.0] * p.shape[0], p)
                for i, p in enumerate(like)
            ]
        if self.kind == "sgd":
            # With momentum 0 torch uses the gradient itself; buf = 0*buf + 1*grad is the same.
            hyper["keep"] = [
                as_tensor(
                    [
                        1.0 if m == 0 else 1.0 - d
                        for m, d in zip(
                            settings["momentum"][i] or [0.0] * p.shape[0],
                            settings["dampening"][i] or [0.0] * p.shape[0],
                        )
                    ],
                    p,
                )
                for i, p in enumerate(like)
            ]
        else:
            # Like torch, bias corrections and the step size are computed in double precision.
            for k in ("beta1", "beta2", "lr"):
                hyper[k + "64"] = [
                    as_tensor(settings[k][i] or [0.0] * p.shape[0], p, torch.float64)
                    for i, p in enumerate(like)
                ]
            for k in ("beta1", "beta2"):
                hyper["1-" + k] = [(1 - b).to(p.dtype) for b, p in zip(hyper[k + "64"], like)]
            hyper["decay"] = [
                (1 - lr * wd.double()).to(p.dtype)
                for lr, wd, p in zip(hyper["lr64"], hyper["weight_decay"], like)
            ]
        return hyper

    def slot_names(self) -> list[str]:
        if self.kind == "sgd":
            return ["momentum_buffer"] if self.has_momentum else []
        return ["exp_avg", "exp_avg_sq"]

    def step(self, stack: Stack, grads: list[torch.Tensor], n_done: int) -> None:
        """One update; ``n_done`` steps were taken before it (0: the first step)."""
        with torch.no_grad():
            if self.kind == "sgd":
                self._sgd(stack, grads, n_done)
            else:
                self._adam(stack, grads, n_done + 1)

    def _trained(self, stack: Stack) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
        """The trained parameters and their settings (cached: this runs every step)."""
        if self._cache is None or self._cache[0] is not stack:
            idx = self.trained
            hy = {k: [v[i] for i in idx] for k, v in stack.hyper.items()}
            self._cache = (stack, [stack.params[i] for i in idx], hy)
        return self._cache[1], self._cache[2]

    def _sgd(self, stack: Stack, grads, n_done: int) -> None:
        ps, hy = self._trained(stack)
        gs = [grads[i] for i in self.trained]
        if self.has_wd:
            gs = [g + p * wd for g, p, wd in zip(gs, ps, hy["weight_decay"])]
        if self.has_momentum:
            bufs = [stack.slots["momentum_buffer"][i] for i in self.trained]
            if n_done == 0:
                torch._foreach_copy_(bufs, gs)
            else:
                torch._foreach_mul_(bufs, hy["momentum"])
                torch._foreach_add_(bufs, torch._foreach_mul(gs, hy["keep"]))
            if self.flags.get("nesterov"):
                gs = torch._foreach_add(gs, torch._foreach_mul(bufs, hy["momentum"]))
            else:
                gs = bufs
        torch._foreach_sub_(ps, torch._foreach_mul(gs, hy["lr"]))

    def _adam(self, stack: Stack, grads, t: int) -> None:
        for i in self.trained:
            p, g = stack.params[i], grads[i]
            hy = {k: v[i] for k, v in stack.hyper.items()}
            if self.has_wd and not self.flags["decoupled"]:
                g = g + p * hy["weight_decay"]
            if self.has_wd and self.flags["decoupled"]:
                p.mul_(hy["decay"])
            m, v = stack.slots["exp_avg"][i], stack.slots["exp_avg_sq"][i]
            m.lerp_(g, hy["1-beta1"])
            v.mul_(hy["beta2"]).add_(g * g * hy["1-beta2"])
            step_size = (hy["lr64"] / (1 - hy["beta164"] ** t)).to(p.dtype)
            bc2_sqrt = (1 - hy["beta264"] ** t).sqrt().to(p.dtype)
            denom = (v.sqrt() / bc2_sqrt).add_(hy["eps"])
            p.sub_((m / denom) * step_size)

    def export(self, stack: Stack, r: int, problem: engine.Problem, names, n_done: int) -> None:
        """Write row ``r``'s optimizer state into the job's own torch optimizer."""
        params = dict(problem.model.named_parameters())
        for i in self.trained:
            param = params[names[i]]
            if self.kind == "sgd":
                if self.has_momentum and stack.hyper["momentum"][i][r].item() != 0:
                    buf = stack.slots["momentum_buffer"][i][r].clone()
                    problem.opt.state[param] = {"momentum_buffer": buf}
            else:
                problem.opt.state[param] = {
                    "step": torch.tensor(float(n_done)),
                    "exp_avg": stack.slots["exp_avg"][i][r].clone(),
                    "exp_avg_sq": stack.slots["exp_avg_sq"][i][r].clone(),
                }

    def import_slots(self, problems, names, params: list[torch.Tensor]):
        """Optimizer state from the jobs' torch optimizers (empty at a fresh start)."""
        slots = {}
        for slot in self.slot_names():
            per_param = []
            for i, p in enumerate(params):
                rows = []
                for j, prob in enumerate(problems):
                    state = prob.opt.state.get(dict(prob.model.named_parameters())[names[i]], {})
                    value = state.get(slot)
                    rows.append(torch.zeros_like(p[j]) if value is None else value.to(p))
                per_param.append(torch.stack(rows))
            slots[slot] = per_param
        return slots


# ----------------------------------------------------------------------------- host bookkeeping


@dataclass
class Track:
    """One job's host-side loop state, updated from the loss buffer as the reference loop does."""

    problem: engine.Problem
    thresholds: list[float]
    timekeys: np.ndarray
    ema: float = math.nan
    curves: engine.Curves | None = None
    seconds: float = 0.0
    exit: int | None = None
    diverged: bool = False
    rng: torch.Tensor | None = None  # the job's global RNG state, when its batch function uses it
    pending: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pending = [t for t, k in zip(self.thresholds, self.timekeys) if np.isnan(k)]

    def scan(self, t0: int, values: Sequence[float]) -> None:
        """Feed the losses of steps t0, t0+1, ...; stops at the job's exit step."""
        hp = self.problem.job.hp
        s = hp.EMA_SMOOTHER
        ema = self.ema
        for i, value in enumerate(values):
            step = t0 + i
            if not math.isfinite(value):
                self.diverged, self.exit = True, step
                break
            ema = value if step == 0 else s * ema + (1 - s) * value
            if self.pending and ema < self.pending[0]:
                newly = np.isnan(self.timekeys) & (ema < np.asarray(self.thresholds))
                self.timekeys[newly] = step
                self.pending = [t for t in self.pending if not ema < t]
            if self.curves is not None:
                self.curves.train[step] = ema
            if hp.VERBOSE and step % hp.EVAL_EVERY == 0:
                label = self.problem.job.label()
                _say(f"[{label}] step {step}: train loss {value:.4g} (ema {ema:.4g})")
            if not self.pending or step == hp.MAX_ITER - 1:
                self.exit = step
                break
        self.ema = ema


def _say(text: str) -> None:
    from tqdm import tqdm

    tqdm.write(text)


# ----------------------------------------------------------------------------- training


def train_batched(
    jobs: Sequence[Job],
    spec: SweepSpec,
    device: torch.device,
    checkpoints: Checkpoints | None = None,
) -> Iterator[JobRecord]:
    """Train ``jobs`` as one stacked model on ``device``, yielding each record as it finishes.

    A job whose setup fails gets a failed record; the rest still train together. With
    ``checkpoints``, each running job is saved under its own key in the one-job loop's format,
    so a job resumes here or in ``engine.train`` alike; jobs resumed from different steps train
    as separate stacks.
    """
    problems: list[engine.Problem] = []
    for job in jobs:
        try:
            problems.append(engine.setup_job(job, spec, device))
        except Exception as err:  # noqa: BLE001 - isolation, as in engine.run_job
            yield engine.failed_record(job, err, device)
    if not problems:
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        resumes = _restore(problems, checkpoints)
        starts = [0 if r is None else r.loop.step + 1 for r in resumes]
        for start in sorted(set(starts)):
            part = [(p, r) for p, r, s in zip(problems, resumes, starts) if s == start]
            yield from _train_part(part, spec, device, checkpoints, start)


@dataclass
class Resume:
    """Where a job's checkpoint left it: the loop state and the job's global RNG state."""

    loop: Any  # engine.LoopState
    rng: torch.Tensor


def _restore(
    problems: list[engine.Problem], checkpoints: Checkpoints | None
) -> list[Resume | None]:
    """Load each job's checkpoint (if any) into its problem; a ``Resume`` or None per job."""
    resumes: list[Resume | None] = []
    for p in problems:
        saved = None if checkpoints is None else checkpoints.load(p.job.key)
        if saved is not None and saved["seed"] == p.job.seed:
            resume = Resume(engine.restore_state(p, saved), saved["torch_rng"])
            _say(
                f"modelscape: resuming job ({p.job.label()}) from its checkpoint "
                f"at step {resume.loop.step}"
            )
            resumes.append(resume)
        else:
            resumes.append(None)
    if checkpoints is not None:
        checkpoints.reset_clock()
    return resumes


def _train_alone(problem: engine.Problem, checkpoints: Checkpoints | None) -> JobRecord:
    try:
        return engine.train(problem, checkpoints)
    except Exception as err:  # noqa: BLE001 - isolation, as in engine.run_job
        return engine.failed_record(problem.job, err, problem.device)


def _train_part(part, spec, device, checkpoints, start) -> Iterator[JobRecord]:
    """Train jobs that all start at ``start``: stacked if they can be, else one at a time."""
    problems = [p for p, _ in part]
    try:
        run = Run(part, device, checkpoints, start)
    except Unbatchable as why:
        if str(why):
            _fall_back(problems[0].job, str(why))
        for p in problems:
            yield _train_alone(p, checkpoints)
        return
    yielded = False
    try:
        for record in run.records():
            yielded = True
            yield record
    except Exception as err:  # noqa: BLE001 - the group's unfinished jobs become failed records
        if not yielded and start == 0 and run.first_window:
            # The stacked run could not take its first steps (an op vmap cannot batch, say):
            # set the jobs up afresh, since the failed attempt may have drawn batches.
            _fall_back(problems[0].job, f"{type(err).__name__}: {err}")
            for p in problems:
                yield engine.run_job(p.job, spec, device, checkpoints)
            return
        for r in run.stack.rows if run.stack is not None else []:
            if run.tracks[r].exit is None:  # not reported yet
                yield engine.failed_record(problems[r].job, err, device)


class Run:
    """One stacked training run of jobs that all start at step ``start``."""

    def __init__(self, part, device, checkpoints, start):
        problems = [p for p, _ in part]
        self.problems = problems
        self.device = device
        self.checkpoints = checkpoints
        self.start = start
        self.clock = time.perf_counter()
        p0 = problems[0]
        self.hp = p0.job.hp
        self.online = self.hp.ONLINE
        self.names = [n for n, _ in p0.model.named_parameters()]
        self._check_shapes()
        # A job that could share a stack (cap >= 2) computes a stack of one as a pair, so its
        # numbers are those of any larger stack; one whose cap is 1 always trains alone, in
        # every run, and skips the pair's second copy. The cap depends on the shape
        # hyperparameters only, so it is the same for every job of the group.
        self.pair_singletons = group_cap(p0.job) >= 2
        if MLPKernel.check(p0, self.hp.PARAMETRIZATION):
            self.kernel: MLPKernel | FuncKernel = MLPKernel(
                p0.model, self.names, self.pair_singletons
            )
        else:
            self.kernel = FuncKernel(problems, self.names, self.pair_singletons)
        kind, trained, settings, flags = _read_optimizers(problems, self.names)
        self.opt = FunctionalOptimizer(kind, trained, settings, flags)
        self.tracks = [self._track(p, loop) for p, loop in part]
        self.stack: Stack | None = self._stack(settings)
        self.first_window = True
        self.uses_global_rng = False

    def _check_shapes(self) -> None:
        p0 = self.problems[0]
        stateful = {type(m).__name__ for m in p0.model.modules() if isinstance(m, STATEFUL_MODULES)}
        if stateful:
            raise Unbatchable(f"the model has {', '.join(sorted(stateful))} layers")
        names = [(n, t.shape, t.dtype) for n, t in p0.model.named_parameters()]
        for p in self.problems[1:]:
            if [(n, t.shape, t.dtype) for n, t in p.model.named_parameters()] != names:
                raise Unbatchable("the jobs' models have different parameters")
            if type(p.model) is not type(p0.model) or p.squeeze != p0.squeeze:
                raise Unbatchable("the jobs' models are of different classes")
            if not self.online and (p.X_tr.shape != p0.X_tr.shape or p.y_tr.shape != p0.y_tr.shape):
                raise Unbatchable("the jobs' training sets have different shapes")
        if self.online and self.hp.CENTER and p0.model0 is None:
            raise Unbatchable("online centering without an initial model")

    def _track(self, p: engine.Problem, resume: Resume | None) -> Track:
        hp = p.job.hp
        loop = None if resume is None else resume.loop
        thresholds = sorted(hp.LOSS_CHECKPOINTS, reverse=True)
        track = Track(
            problem=p,
            thresholds=thresholds,
            timekeys=np.full(len(thresholds), np.nan) if loop is None else loop.timekeys,
            ema=math.nan if loop is None else loop.ema,
            curves=(None if hp.ONLYTHRESHOLDS else engine.Curves(hp.MAX_ITER))
            if loop is None
            else loop.curves,
            seconds=0.0 if loop is None else loop.seconds,
        )
        if self.online:
            # The one-job loop seeds the global RNG per job; keep a state per job in case the
            # batch function draws from it (checked at the first draw).
            if loop is None:
                torch.manual_seed(engine.training_rng_seed(p.job))
                track.rng = torch.get_rng_state()
            else:
                track.rng = resume.rng
        return track

    def _stack(self, settings) -> Stack:
        ps = self.problems
        params = [
            torch.stack([dict(p.model.named_parameters())[n].detach() for p in ps])
            for n in self.names
        ]
        hyper = self.opt.build(settings, params)
        slots = self.opt.import_slots(ps, self.names, params)
        gammas = [p.gamma for p in ps]
        gamma = torch.tensor(gammas, dtype=params[0].dtype, device=self.device)
        data: dict[str, torch.Tensor | None] = {
            "gamma": gamma,
            # Dividing by 1 is exact, so a group without GAMMA != 1 skips the division.
            "gamma_b": None if all(g == 1.0 for g in gammas) else gamma.view(-1, 1, 1),
            "X": None if self.online else torch.stack([p.X_tr for p in ps]),
            "y": None if self.online else torch.stack([p.y_tr for p in ps]),
            "f0": None
            if self.online or ps[0].f0_tr is None
            else torch.stack([p.f0_tr for p in ps]),
        }
        if isinstance(self.kernel, FuncKernel):
            data.update(self.kernel.stacked_buffers(ps))
        init = None
        if self.online and self.hp.CENTER:
            init = [
                torch.stack([dict(p.model0.named_parameters())[n].detach() for p in ps])
                for n in self.names
            ]
        return Stack(list(range(len(ps))), params, slots, hyper, data, init)

    # -- batches

    def _draw(self, stack: Stack, step: int):
        """The online batch of ``step`` for every job in ``stack``, stacked."""
        Xs, ys = [], []
        for r in stack.rows:
            track = self.tracks[r]
            p = track.problem
            if self.uses_global_rng or step == self.start:
                torch.set_rng_state(track.rng)
            X, y = p.batch_fn(step)
            if step == 0:
                check_batch(X, y, p.job.hp.N_SAMPLES, "batch_fn(0)")
            if self.uses_global_rng or step == self.start:
                after = torch.get_rng_state()
                if not torch.equal(after, track.rng):
                    self.uses_global_rng = True
                track.rng = after
            X, y = engine.to_device(X, y, self.device, p.job.hp.DTYPE)
            Xs.append(X)
            ys.append(y)
        X, y = torch.stack(Xs), torch.stack(ys)
        f0 = None
        if stack.init is not None:
            with torch.no_grad():
                f0 = self.kernel.forward(stack, stack.init, X)
        return X, y, f0

    def _batch(self, stack: Stack, step: int, cache: list | None):
        if not self.online:
            return stack.data["X"], stack.data["y"], stack.data["f0"]
        batch = self._draw(stack, step)
        if cache is not None:
            cache.append(batch)
        return batch

    def _train_step(self, stack: Stack, X, y, f0, step: int) -> torch.Tensor:
        losses, grads = self.kernel.loss_and_grads(stack, X, y, f0)
        self.opt.step(stack, grads, step)
        return losses

    # -- the loop

    def _window_end(self, t: int) -> int:
        end = t + SYNC_EVERY
        for r in self.stack.rows:
            hp = self.problems[r].job.hp
            end = min(end, hp.MAX_ITER)
            if not hp.ONLYTHRESHOLDS:
                # stop right after the next evaluation step, where the curves need the state
                end = min(end, (t + hp.EVAL_EVERY - 1) // hp.EVAL_EVERY * hp.EVAL_EVERY + 1)
        return end

    def records(self) -> Iterator[JobRecord]:
        t = self.start
        while self.stack is not None and self.stack.rows:
            stack = self.stack
            t1 = self._window_end(t)
            snapshot = stack.mutable()
            cache: list | None = [] if self.online else None
            window = []
            for step in range(t, t1):
                X, y, f0 = self._batch(stack, step, cache)
                window.append(self._train_step(stack, X, y, f0, step))
            # the window's one host sync
            losses = torch.stack(window, 1).to("cpu", torch.float64).tolist()
            self.first_window = False
            last = (X, y)
            exits: list[int] = []
            replay: list[int] = []
            for pos, r in enumerate(stack.rows):
                track = self.tracks[r]
                track.scan(t, losses[pos])
                if track.exit is None:
                    continue
                exits.append(pos)
                if not track.diverged and track.exit < t1 - 1:
                    replay.append(pos)
            for pos, r in enumerate(stack.rows):
                track = self.tracks[r]
                if track.exit is not None and track.diverged:
                    yield self._diverged(track)
                elif track.exit == t1 - 1:
                    yield self._finish(stack, pos, track, last, t1 - 1)
                elif track.exit is None and self._eval_due(track, t1 - 1):
                    try:
                        self._eval(stack, pos, track, last, t1 - 1)
                    except Exception as err:  # noqa: BLE001 - a failing grab fails its job only
                        track.exit = t1 - 1
                        exits.append(pos)
                        yield engine.failed_record(track.problem.job, err, self.device)
            if replay:
                yield from self._replay(stack, snapshot, replay, cache, t)
            keep = [pos for pos in range(len(stack.rows)) if pos not in exits]
            if exits:
                self.stack = stack.take(keep) if keep else None
            t = t1
            if self.stack is not None and self.checkpoints is not None and self.checkpoints.due():
                self._save(self.stack, t - 1)

    def _replay(self, stack: Stack, snapshot, replay: list[int], cache, t0: int):
        """Rerun the window for the jobs that exited inside it, each up to its exit step."""
        sub = Stack(list(stack.rows), *snapshot, stack.hyper, stack.data, stack.init).take(replay)
        end = max(self.tracks[r].exit for r in sub.rows)
        for step in range(t0, end + 1):
            if self.online:
                X, y, f0 = cache[step - t0]
                idx = torch.tensor(replay, device=X.device)
                X, y = X.index_select(0, idx), y.index_select(0, idx)
                f0 = None if f0 is None else f0.index_select(0, idx)
            else:
                X, y, f0 = sub.data["X"], sub.data["y"], sub.data["f0"]
            self._train_step(sub, X, y, f0, step)
            for pos, r in enumerate(sub.rows):
                if self.tracks[r].exit == step:
                    yield self._finish(sub, pos, self.tracks[r], (X, y), step)

    def _eval_due(self, track: Track, step: int) -> bool:
        return track.curves is not None and step % track.problem.job.hp.EVAL_EVERY == 0

    def _load_job(self, stack: Stack, pos: int, track: Track, step: int, with_opt: bool) -> None:
        """Copy row ``pos`` into the job's own module (and optimizer) for evaluation or saving."""
        p = track.problem
        with torch.no_grad():
            for i, param in enumerate(p.model.parameters()):
                param.copy_(stack.params[i][pos])
        if with_opt:
            self.opt.export(stack, pos, p, self.names, step + 1)

    def _eval(self, stack: Stack, pos: int, track: Track, batch, step: int) -> None:
        p = track.problem
        self._load_job(stack, pos, track, step, with_opt=bool(p.grabs))
        X, y = batch[0][pos], batch[1][pos]
        values = {"test_loss": p.test_loss(), **engine.evaluate_grabs(p, X, y, step)}
        track.curves.add_eval(step, values)

    def _finish(self, stack: Stack, pos: int, track: Track, batch, step: int) -> JobRecord:
        p = track.problem
        try:
            if track.curves is not None:
                self._eval(stack, pos, track, batch, step)
            else:
                self._load_job(stack, pos, track, step, with_opt=bool(p.grabs))
            record = self._record(track, "ok", step)
            record.train_loss = track.ema
            record.test_loss = p.test_loss()
            X, y = batch[0][pos], batch[1][pos]
            record.grabs = engine.evaluate_grabs(p, X, y, step) if p.grabs else {}
            if track.curves is not None:
                record.curves = track.curves.finish(step, diverged=False)
            return record
        except Exception as err:  # noqa: BLE001 - a failing grab fails its job only
            return engine.failed_record(p.job, err, self.device)

    def _diverged(self, track: Track) -> JobRecord:
        record = self._record(track, "diverged", track.exit)
        if track.curves is not None:
            record.curves = track.curves.finish(track.exit - 1, diverged=True)
        return record

    def _record(self, track: Track, status, step: int) -> JobRecord:
        job = track.problem.job
        # A job's seconds: its share of the group's wall time so far.
        share = (time.perf_counter() - self.clock) / len(self.problems)
        return JobRecord(
            key=job.key,
            seed=job.seed,
            status=status,
            timekeys=track.timekeys,
            steps=step + 1,
            seconds=track.seconds + share,
            device=str(self.device),
        )

    def _save(self, stack: Stack, step: int) -> None:
        """Checkpoint every running job in the one-job loop's format."""
        share = (time.perf_counter() - self.clock) / len(self.problems)
        for pos, r in enumerate(stack.rows):
            track = self.tracks[r]
            self._load_job(stack, pos, track, step, with_opt=True)
            if track.rng is not None:
                torch.set_rng_state(track.rng)
            loop = engine.LoopState(
                step, track.ema, track.timekeys, track.curves, track.seconds + share
            )
            self.checkpoints.save(track.problem.job.key, engine.snapshot(track.problem, loop))
