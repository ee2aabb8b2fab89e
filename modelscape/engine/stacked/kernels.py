"""How a stack computes its jobs' losses and gradients: the model kernels.

``MLPKernel`` runs the built-in MLP with MSE loss as batched matmuls with a hand-written
backward pass (its activations come from ``KERNEL_ACTIVATIONS``: one entry per activation);
``FuncKernel`` runs any other model through ``torch.func`` (``vmap`` over ``functional_call``)
with autograd. ``bmm``/``baddbmm``/``as_pair`` keep a job's numbers independent of how many jobs
share its stack.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelscape.engine.setup import Problem
from modelscape.engine.stacked.stack import BUFFER, Stack
from modelscape.models import MLP

aten = torch.ops.aten


@dataclass(frozen=True)
class Activation:
    """An activation as the MLP kernel computes it: forward (may work in place on the
    pre-activation) and backward from the saved pre-activation (``saves_input``) or output."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    saves_input: bool


# The activations the MLP kernel computes by hand, built from the model's activation module;
# a model with any other activation trains stacked through ``FuncKernel``.
KERNEL_ACTIVATIONS: dict[type[nn.Module], Callable[[nn.Module], Activation]] = {
    nn.ReLU: lambda m: Activation(
        lambda z: z.relu_(), lambda g, out: aten.threshold_backward(g, out, 0), False
    ),
    nn.Tanh: lambda m: Activation(lambda z: z.tanh_(), aten.tanh_backward, False),
    nn.Identity: lambda m: Activation(lambda z: z, lambda g, out: g, False),
    nn.GELU: lambda m: Activation(
        lambda z: nn.functional.gelu(z, approximate=m.approximate),
        lambda g, z: aten.gelu_backward(g, z, approximate=m.approximate),
        True,
    ),
    nn.SiLU: lambda m: Activation(nn.functional.silu, aten.silu_backward, True),
}


def bmm(a: torch.Tensor, b: torch.Tensor, pair: bool) -> torch.Tensor:
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


def baddbmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, pair: bool) -> torch.Tensor:
    """``torch.baddbmm`` with the same stack-size independence as ``bmm``."""
    if pair and a.shape[0] == 1:
        out = torch.baddbmm(bias.expand(2, -1, -1), a.expand(2, -1, -1), b.expand(2, -1, -1))
        return out[:1]
    return torch.baddbmm(bias, a, b)


class MLPKernel:
    """The built-in MLP with MSE loss as batched matmuls, with its backward pass written out.

    Autograd is skipped because, for small models, its bookkeeping costs more than the math.
    ``pair_singletons``: compute a stack of one job as a broadcast pair (see ``bmm``).
    """

    def __init__(self, model: MLP, names: list[str], pair_singletons: bool):
        self.pair = pair_singletons
        self.act = KERNEL_ACTIVATIONS[type(model.nonlin)](model.nonlin)
        index = {n: i for i, n in enumerate(names)}
        hidden = ["input_layer"] + [f"hidden_layers.{k}" for k in range(len(model.hidden_layers))]
        self.layers = [(index[f"{h}.weight"], index.get(f"{h}.bias")) for h in hidden]
        self.readout = (index["output_layer.weight"], index.get("output_layer.bias"))

    @staticmethod
    def check(problem: Problem, parametrization: str) -> bool:
        """Whether this kernel computes exactly what the job's model and loss do."""
        model, loss_fn = problem.model, problem.loss_fn
        return (
            type(model) is MLP
            and problem.y_te.is_floating_point()
            and problem.y_te.dim() <= 2
            and parametrization == "sp"
            and type(loss_fn) is nn.MSELoss
            and loss_fn.reduction == "mean"
            and type(model.nonlin) in KERNEL_ACTIVATIONS
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
                bmm(h, W.mT, self.pair)
                if bi is None
                else baddbmm(params[bi][:, None], h, W.mT, self.pair)
            )
            if self.act.saves_input:
                saved.append(z)
            h = self.act.forward(z)
            saved.append(h)
        wi, bi = self.readout
        W = params[wi]
        f = (
            bmm(h, W.mT, self.pair)
            if bi is None
            else baddbmm(params[bi][:, None], h, W.mT, self.pair)
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
        grads[wi] = bmm(g.mT, h, self.pair)
        # an outer product (one output) is faster as a broadcast multiply than as a bmm
        gh = g * W if W.shape[1] == 1 else bmm(g, W, self.pair)
        if bi is not None:
            grads[bi] = g.sum(1)
        for k in range(len(self.layers) - 1, -1, -1):
            wi, bi = self.layers[k]
            h_out = saved.pop()  # this layer's output; below it, its input (and pre-activation)
            gz = self.act.backward(gh, saved.pop() if self.act.saves_input else h_out)
            h_in = saved[-1]
            grads[wi] = bmm(gz.mT, h_in, self.pair)
            if bi is not None:
                grads[bi] = gz.sum(1)
            if k > 0:
                gh = bmm(gz, params[wi], self.pair)
        return losses, grads


class FuncKernel:
    """Any model: ``vmap`` over ``torch.func.functional_call``, gradients by autograd.

    ``pair_singletons``: compute a stack of one job as a broadcast pair (see ``as_pair``).
    """

    def __init__(self, problems: list[Problem], names: list[str], pair_singletons: bool):
        self.pair = pair_singletons
        p0 = problems[0]
        self.module = copy.deepcopy(p0.model).train()
        self.names = names
        self.loss_fn = p0.loss_fn
        self.squeeze = p0.squeeze
        self.buffer_names = [n for n, _ in p0.model.named_buffers()]

    def stacked_buffers(self, problems: list[Problem]) -> dict[str, torch.Tensor]:
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
        args = as_pair((tuple(params), self._buffers(stack), X), n, self.pair)
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
        args = as_pair(data, n, self.pair)
        losses = torch.func.vmap(one, in_dims=in_dims)(*args)[:n]
        grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
        if any(g is None for g in grads):
            # torch optimizers skip a parameter without a gradient; the stacked ones cannot
            raise RuntimeError("a parameter of the model gets no gradient")
        return losses.detach(), list(grads)


def as_pair(tree: Any, n_jobs: int, pair: bool) -> Any:
    """With ``pair``, a stack of one job as a broadcast pair (see ``bmm``); other stacks, and
    every stack without ``pair``, unchanged. Only the first copy's outputs are used, so the
    second adds exactly zero to every gradient."""
    if n_jobs != 1 or not pair:
        return tree
    if isinstance(tree, torch.Tensor):
        return tree.expand(2, *tree.shape[1:])
    if isinstance(tree, dict):
        return {k: as_pair(v, n_jobs, pair) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(as_pair(v, n_jobs, pair) for v in tree)
    return tree  # None


def _has_hooks(model: nn.Module) -> bool:
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules()
    )
