"""Torch optimizers applied to stacked parameters: one class per optimizer, in a registry.

Each ``StackedOptimizer`` reads every job's settings from that job's own torch optimizer (its
param groups, so per-layer learning rates from a parametrization carry over), names its state
slots, takes a step on the whole stack, and exports a row's state back into the job's torch
optimizer (for checkpoints and grabs), in torch's own format.

To stack another torch optimizer, write one subclass and register it for the torch class with
``@register(torch.optim.X)``; grouping, the stacked run and checkpoints pick it up from
``STACKED_OPTIMIZERS``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from modelscape.engine.setup import Problem
from modelscape.engine.stacked.stack import Stack, Unbatchable

Tensors = list[torch.Tensor]

STACKED_OPTIMIZERS: dict[type[torch.optim.Optimizer], type[StackedOptimizer]] = {}


def register(*torch_classes: type[torch.optim.Optimizer]) -> Callable[[type], type]:
    """Class decorator: the stacked version of these torch optimizer classes."""

    def add(cls: type[StackedOptimizer]) -> type[StackedOptimizer]:
        for torch_cls in torch_classes:
            STACKED_OPTIMIZERS[torch_cls] = cls
        return cls

    return add


def as_rows(values: Sequence[float], like: torch.Tensor, dtype=None) -> torch.Tensor:
    """Per-job values as a tensor that broadcasts against the stacked parameter ``like``."""
    t = torch.tensor(values, dtype=dtype or like.dtype, device=like.device)
    return t.view(-1, *([1] * (like.dim() - 1)))


class StackedOptimizer:
    """A torch optimizer's update on stacked parameters, one set of settings per job.

    A subclass names the settings it reads from a param group (``settings``, filled by
    ``read``), derives the tensors its step uses (``derive``), names its state (``slot_names``,
    at most ``max_slots`` of them), and implements ``step`` and ``export_state``.
    """

    settings: ClassVar[tuple[str, ...]] = ()
    # whether a step may give a parameter and its state another memory layout (False while
    # the kernel's step is a captured CUDA graph, which holds the old tensors)
    relayout = True
    # state tensors per parameter at most (``slot_names``' longest answer): what sizes a stack
    max_slots: ClassVar[int] = 0

    def __init__(self, problems: Sequence[Problem], names: list[str]):
        self.names = names
        self.values: dict[str, list[list[float]]] = {k: [[] for _ in names] for k in self.settings}
        self.mask: list[bool] | None = None  # which parameters the optimizers train
        self.flags: dict[str, Any] | None = None
        self.any: dict[str, bool] | None = None
        self._cache: tuple | None = None
        self.add(problems)

    def add(self, problems: Sequence[Problem]) -> None:
        """Read the settings of more jobs, rows numbered after those read before (jobs that
        join a running stack). Raises ``Unbatchable``, having read nothing, when they cannot
        share the stack, or would need optimizer state the stack does not hold."""
        names, mask = self.names, self.mask
        cls = type(problems[0].opt) if mask is None else self.cls
        values: dict[str, list[list[float]]] = {k: [[] for _ in names] for k in self.settings}
        flags: set[tuple] = set((self.flags or {}).items())
        for p in problems:
            if type(p.opt) is not cls:
                raise Unbatchable("the jobs' optimizers are of different classes")
            groups = {id(q): g for g in p.opt.param_groups for q in g["params"]}
            params = dict(p.model.named_parameters())
            mine = [id(params[n]) in groups and params[n].requires_grad for n in names]
            if mask is None:
                mask = mine
            elif mine != mask:
                raise Unbatchable("the jobs' optimizers train different parameters")
            for i, n in enumerate(names):
                g = groups.get(id(params[n]))
                if g is None:
                    continue
                if g.get("maximize") or g.get("differentiable"):
                    raise Unbatchable("maximize and differentiable have no stacked version")
                read, group_flags = self.read(g, cls)
                flags.update(group_flags.items())
                for k, v in zip(self.settings, read):
                    values[k][i].append(float(v))
        if len(flags) > len(dict(flags)):
            raise Unbatchable(f"the jobs' optimizers differ in {sorted(flags)}")
        for k, vs in values.items():
            for i, per_param in enumerate(vs):
                per_param[:0] = self.values[k][i]
        nonzero = {k: any(v for per_param in vs for v in per_param) for k, vs in values.items()}
        if self.any is not None and nonzero != self.any:
            raise Unbatchable("the joining jobs need optimizer state the stack does not hold")
        self.cls, self.mask, self.flags = cls, mask, dict(flags)
        self.trained = [i for i, t in enumerate(mask) if t]
        self.values, self.any = values, nonzero

    # -- what a subclass provides

    def read(self, group: dict[str, Any], torch_cls: type) -> tuple[Sequence[float], dict]:
        """The values of ``settings`` in this param group, and flags that must agree."""
        raise NotImplementedError

    def derive(
        self, hyper: dict[str, Tensors], like: Tensors, values: dict[str, list[list[float]]]
    ) -> None:
        """Add the tensors the step needs beyond the settings themselves (``values``: the
        settings of the stack's rows, per parameter)."""

    def slot_names(self) -> list[str]:
        raise NotImplementedError

    def step(self, stack: Stack, grads: Tensors, t: int) -> None:
        """One update at the stack's step ``t``: row ``r`` took ``t - stack.offsets[r]``
        steps before it (0: its first step)."""
        raise NotImplementedError

    def export_state(self, stack: Stack, i: int, r: int, n_done: int) -> dict | None:
        """Row ``r``'s state of parameter ``i`` in the torch optimizer's format (None: none)."""
        raise NotImplementedError

    # -- shared

    def hyper(self, like: Tensors, rows: Sequence[int]) -> dict[str, Tensors]:
        """The settings of jobs ``rows`` as tensors that broadcast against each stacked
        parameter ``like``."""
        values = {
            k: [
                [per_param[r] for r in rows] if per_param else [0.0] * len(rows) for per_param in vs
            ]
            for k, vs in self.values.items()
        }
        hyper = {
            k: [as_rows(per_param[i], p) for i, p in enumerate(like)]
            for k, per_param in values.items()
        }
        self.derive(hyper, like, values)
        return hyper

    def _trained(self, stack: Stack) -> tuple[Tensors, dict[str, Tensors]]:
        """The trained parameters and their settings (cached: this runs every step)."""
        if self._cache is None or self._cache[0] is not stack:
            idx = self.trained
            hy = {k: [v[i] for i in idx] for k, v in stack.hyper.items()}
            self._cache = (stack, [stack.params[i] for i in idx], hy)
        return self._cache[1], self._cache[2]

    def export(self, stack: Stack, r: int, problem: Problem, names: list[str], n_done: int):
        """Write row ``r``'s optimizer state into the job's own torch optimizer."""
        params = dict(problem.model.named_parameters())
        for i in self.trained:
            state = self.export_state(stack, i, r, n_done)
            if state is not None:
                problem.opt.state[params[names[i]]] = state

    def import_slots(self, problems: Sequence[Problem], names: list[str], params: Tensors):
        """Optimizer state from the jobs' torch optimizers (zeros at a fresh start)."""
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


@register(torch.optim.SGD)
class StackedSGD(StackedOptimizer):
    """SGD with momentum, dampening, Nesterov and weight decay."""

    settings = ("lr", "momentum", "dampening", "weight_decay")
    max_slots = 1  # the momentum buffer, every job's once any job of the stack has momentum

    def read(self, group, torch_cls):
        values = (group["lr"], group["momentum"], group["dampening"], group["weight_decay"])
        return values, {"nesterov": bool(group["nesterov"])}

    def derive(self, hyper, like, values):
        # With momentum 0 torch uses the gradient itself; buf = 0*buf + 1*grad is the same.
        hyper["keep"] = [
            as_rows(
                [
                    1.0 if m == 0 else 1.0 - d
                    for m, d in zip(values["momentum"][i], values["dampening"][i])
                ],
                p,
            )
            for i, p in enumerate(like)
        ]

    def slot_names(self):
        return ["momentum_buffer"] if self.any["momentum"] else []

    def step(self, stack, grads, t):
        with torch.no_grad():
            ps, hy = self._trained(stack)
            gs = [grads[i] for i in self.trained]
            if self.any["weight_decay"]:
                gs = [g + p * wd for g, p, wd in zip(gs, ps, hy["weight_decay"])]
            if self.any["momentum"]:
                bufs = [stack.slots["momentum_buffer"][i] for i in self.trained]
                if stack.in_step and t == stack.offsets[0]:
                    torch._foreach_copy_(bufs, gs)
                else:
                    torch._foreach_mul_(bufs, hy["momentum"])
                    torch._foreach_add_(bufs, torch._foreach_mul(gs, hy["keep"]))
                    if not stack.in_step and t in stack.offsets:
                        # rows taking their first step: torch's buffer starts as the gradient
                        first = [r for r, o in enumerate(stack.offsets) if o == t]
                        for buf, g in zip(bufs, gs):
                            buf[first] = g[first]
                if self.flags.get("nesterov"):
                    gs = torch._foreach_add(gs, torch._foreach_mul(bufs, hy["momentum"]))
                else:
                    gs = bufs
            torch._foreach_sub_(ps, torch._foreach_mul(gs, hy["lr"]))

    def export_state(self, stack, i, r, n_done):
        if self.any["momentum"] and stack.hyper["momentum"][i][r].item() != 0:
            return {"momentum_buffer": stack.slots["momentum_buffer"][i][r].clone()}
        return None


@register(torch.optim.Adam, torch.optim.AdamW)
class StackedAdam(StackedOptimizer):
    """Adam and AdamW (decoupled weight decay); amsgrad has no stacked version.

    The update is torch's fused Adam kernel (``torch._fused_adam_``/``_fused_adamw_``, what
    ``torch.optim.Adam(fused=True)`` runs): one pass over each parameter instead of about ten.
    It takes one set of settings per call, so each parameter's rows are called in groups of
    equal settings (jobs that differ in LR, betas, eps or weight decay form groups of their own;
    a row's numbers do not depend on which rows share its call).
    """

    settings = ("lr", "beta1", "beta2", "eps", "weight_decay")
    max_slots = 2
    _groups_of: Stack | None = None  # the stack whose row groups ``_groups`` holds
    _counts: tuple[torch.Tensor, torch.Tensor]  # its rows' -offsets, and their step counts

    def read(self, group, torch_cls):
        if group.get("amsgrad"):
            raise Unbatchable("amsgrad has no stacked version")
        values = (group["lr"], *group["betas"], group["eps"], group["weight_decay"])
        decoupled = torch_cls is torch.optim.AdamW or bool(group.get("decoupled_weight_decay"))
        return values, {"decoupled": decoupled}

    def slot_names(self):
        return ["exp_avg", "exp_avg_sq"]

    def _row_groups(self, stack: Stack, i: int) -> list[tuple[tuple[float, ...], list[int], list]]:
        """Parameter ``i``'s stack positions grouped by their settings, with the rows of its
        parameter and state in each group and, for rows at different steps, views of their
        step counts (made once per stack: they are updated in place)."""
        if self._groups_of is not stack:
            self._groups_of, self._groups = stack, {}
            like = stack.params[0]
            base = torch.tensor([-o for o in stack.offsets], dtype=torch.float32)
            self._counts = (base.to(like.device), torch.empty_like(base, device=like.device))
        if i not in self._groups:
            groups: dict[tuple[float, ...], list[int]] = {}
            for pos, row in enumerate(stack.rows):
                key = tuple(self.values[k][i][row] for k in self.settings)
                groups.setdefault(key, []).append(pos)
            p, m, v = stack.params[i], stack.slots["exp_avg"][i], stack.slots["exp_avg_sq"][i]
            counts = self._counts[1]
            packed = [_packed_rows(t) for t in (p, m, v)] + [counts.unbind(0)]
            self._groups[i] = [
                (key, rows, [[t[r] for r in rows] for t in packed]) for key, rows in groups.items()
            ]
        return self._groups[i]

    def step(self, stack, grads, t):
        fused = torch._fused_adamw_ if self.flags["decoupled"] else torch._fused_adam_
        like = stack.params[0]
        # the kernel reads each tensor's step count (Adam's bias correction); torch's optimizer
        # counts in float32, exactly up to 2**24 steps
        same = None
        if stack.in_step:
            n = float(t - stack.offsets[0] + 1)
            same = torch.full((), n, dtype=torch.float32, device=like.device)
        elif self.trained:
            self._row_groups(stack, self.trained[0])  # the stack's step counts
            base, counts = self._counts
            torch.add(base, float(t + 1), out=counts)
        with torch.no_grad():
            for i in self.trained:
                g = _packed_rows(self._in_layout(stack, i, grads[i]))
                groups = self._row_groups(stack, i)
                for (lr, beta1, beta2, eps, wd), rows, (ps, ms, vs, ts) in groups:
                    fused(
                        ps,
                        [g[r] for r in rows],
                        ms,
                        vs,
                        [],
                        ts if same is None else [same] * len(rows),
                        lr=lr,
                        beta1=beta1,
                        beta2=beta2,
                        weight_decay=wd,
                        eps=eps,
                        amsgrad=False,
                        maximize=False,
                    )

    def _in_layout(self, stack: Stack, i: int, g: torch.Tensor) -> torch.Tensor:
        """The gradient in the memory layout of parameter ``i`` and its state. The fused
        kernel runs in place on contiguous tensors only (it copies others in and out), so the
        four take one layout and are handed to it as contiguous permuted views (``_packed_rows``).
        Autograd's gradients may come permuted (a ``vmap``ped ``nn.Linear``'s weight gradient
        comes transposed): then, unless the step is a captured graph (``relayout`` False), the
        parameter and its state take the gradient's layout, once per stack, instead of the
        gradient being copied every step."""
        p = stack.params[i]
        if g.stride() == p.stride():
            return g
        if not (self.relayout and _dense(g)):
            return g.contiguous() if p.is_contiguous() else torch.empty_like(p).copy_(g)
        stack.params[i] = torch.empty_like(g).copy_(p)  # empty_like keeps a dense layout
        for name in self.slot_names():
            stack.slots[name][i] = torch.empty_like(g).copy_(stack.slots[name][i])
        if self._groups_of is stack:
            self._groups.pop(i, None)  # its row views are of the old tensors
        return g

    def export_state(self, stack, i, r, n_done):
        return {
            "step": torch.tensor(float(n_done)),
            "exp_avg": stack.slots["exp_avg"][i][r].clone(memory_format=torch.contiguous_format),
            "exp_avg_sq": stack.slots["exp_avg_sq"][i][r].clone(
                memory_format=torch.contiguous_format
            ),
        }


@register(torch.optim.RMSprop)
class StackedRMSprop(StackedOptimizer):
    """RMSprop with momentum and weight decay; centered RMSprop has no stacked version."""

    settings = ("lr", "alpha", "eps", "weight_decay", "momentum")
    max_slots = 2

    def read(self, group, torch_cls):
        if group.get("centered"):
            raise Unbatchable("centered RMSprop has no stacked version")
        values = (group["lr"], group["alpha"], group["eps"], group["weight_decay"])
        return (*values, group["momentum"]), {}

    def derive(self, hyper, like, values):
        hyper["1-alpha"] = [1 - a for a in hyper["alpha"]]

    def slot_names(self):
        return ["square_avg", "momentum_buffer"] if self.any["momentum"] else ["square_avg"]

    def step(self, stack, grads, n_done):
        with torch.no_grad():
            for i in self.trained:
                p, g = stack.params[i], grads[i]
                hy = {k: v[i] for k, v in stack.hyper.items()}
                if self.any["weight_decay"]:
                    g = g + p * hy["weight_decay"]
                v = stack.slots["square_avg"][i]
                v.mul_(hy["alpha"]).add_(g * g * hy["1-alpha"])
                avg = v.sqrt().add_(hy["eps"])
                if self.any["momentum"]:
                    # a job with momentum 0 keeps buf = grad/avg: torch's update without momentum
                    buf = stack.slots["momentum_buffer"][i]
                    buf.mul_(hy["momentum"]).add_(g / avg)
                    p.sub_(buf * hy["lr"])
                else:
                    p.sub_((g / avg) * hy["lr"])

    def export_state(self, stack, i, r, n_done):
        state = {
            "step": torch.tensor(float(n_done)),
            "square_avg": stack.slots["square_avg"][i][r].clone(),
        }
        if self.any["momentum"] and stack.hyper["momentum"][i][r].item() != 0:
            state["momentum_buffer"] = stack.slots["momentum_buffer"][i][r].clone()
        return state


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its memory exactly, in some order of its dimensions."""
    size = 1
    for stride, n in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride != size:
            return False
        size *= n
    return True


def _packed_rows(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows of a stacked tensor as contiguous views: each row's dimensions permuted to
    its memory order (an elementwise update is the same in any order of the dimensions); the
    rows as they are when they are contiguous or not dense."""
    if t.dim() > 1 and not t[0].is_contiguous():
        order = sorted(range(1, t.dim()), key=lambda d: -t.stride(d))
        view = t.permute(0, *order)
        if view[0].is_contiguous():
            return view.unbind(0)
    return t.unbind(0)
