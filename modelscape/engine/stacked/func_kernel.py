"""``FuncKernel``: any model as a stack, through ``torch.func`` (``vmap`` over
``functional_call``), gradients by autograd.

The model's buffers are per job (``Stack.data``): parametrization multipliers, and BatchNorm's
running statistics, which a training step updates in place, each job its own. Dropout masks
come from each job's own stream (``engine.stateful``): the run draws them per step and the
kernel's copy of the model applies them, each job its own, inside ``vmap``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from modelscape.engine.setup import Problem
from modelscape.engine.stacked.batching import batched_operations, has_attention, has_batch_norm
from modelscape.engine.stacked.stack import BUFFER, INIT_BUFFER, Stack
from modelscape.engine.stateful import StackDropout


class FuncKernel:
    """Any model: ``vmap`` over ``torch.func.functional_call``, gradients by autograd.

    ``pair_singletons``: compute a stack of one job as a broadcast pair (see ``as_pair``).
    ``compute``: run the forward pass and loss under ``torch.autocast`` in that dtype. Its
    stack's jobs all have the same N_SAMPLES.
    """

    name = "torch.func"

    def __init__(
        self,
        problems: list[Problem],
        names: list[str],
        pair_singletons: bool,
        compute: torch.dtype | None = None,
    ):
        self.pair = pair_singletons
        self.compute = compute
        p0 = problems[0]
        self.module = copy.deepcopy(p0.model).train()
        self.dropout = StackDropout(self.module)
        self.norms = has_batch_norm(self.module)
        self.attention = has_attention(self.module)
        # the initial model as f_init (online centering): in evaluation mode, as ``model0``
        self.init_module = copy.deepcopy(p0.model).eval()
        self.names = names
        self.loss_fn = p0.loss_fn
        self.squeeze = p0.squeeze
        self.buffer_names = [n for n, _ in p0.model.named_buffers()]

    def probe(self, problem: Problem, n_samples: int) -> str | None:
        """Run one forward pass of two copies of the job (its first test input repeated
        ``n_samples`` times): record its Dropout calls, or say why it cannot stack."""
        params = tuple(p.detach().expand(2, *p.shape) for p in problem.model.parameters())
        buffers = {n: b.expand(2, *b.shape).clone() for n, b in problem.model.named_buffers()}
        x = problem.X_te[:1].expand(n_samples, *problem.X_te.shape[1:])
        X = x.expand(2, *x.shape)
        return self.dropout.probe(lambda: self._vmap(self._apply)(params, buffers, X))

    @property
    def draws_masks(self) -> bool:
        """Whether a step draws Dropout masks (the run passes them in ``masks``)."""
        return bool(self.dropout.calls)

    @property
    def stateful(self) -> bool:
        """Whether a step draws masks or updates buffers (BatchNorm): then it is never captured
        as a CUDA graph, whose warm-up steps would update the statistics again."""
        return self.draws_masks or self.norms

    def stacked_buffers(self, problems: list[Problem]) -> dict[str, torch.Tensor]:
        """The jobs' buffers (parametrization multipliers, running statistics), for
        ``Stack.data``; with online centering also the initial model's (``INIT_BUFFER``)."""
        out = {
            BUFFER + n: torch.stack([dict(p.model.named_buffers())[n] for p in problems])
            for n in self.buffer_names
        }
        if problems[0].model0 is not None:
            for n in self.buffer_names:
                rows = [dict(p.model0.named_buffers())[n] for p in problems]
                out[INIT_BUFFER + n] = torch.stack(rows)
        return out

    def _buffers(self, stack: Stack, prefix: str = BUFFER) -> dict[str, torch.Tensor]:
        return {n: stack.data[prefix + n] for n in self.buffer_names}

    def _apply(self, params, buffers, x, module=None):
        mapping = (dict(zip(self.names, params)), buffers)
        return torch.func.functional_call(module or self.module, mapping, (x,))

    def _autocast(self, X: torch.Tensor):
        return torch.autocast(X.device.type, self.compute or X.dtype, enabled=bool(self.compute))

    def _vmap(self, fn, **kwargs):
        """``torch.func.vmap(fn)`` with the operations that ``vmap`` runs badly replaced
        (``batching.batched_operations``: attention, BatchNorm)."""
        batched = torch.func.vmap(fn, **kwargs)

        def run(*args):
            with batched_operations(self.norms, self.attention):
                return batched(*args)

        return run

    @staticmethod
    def _jobs(stack: Stack, flat: torch.Tensor | None) -> torch.Tensor | None:
        """A flat (rows, ...) tensor as [jobs, n, ...] (a stack of one sample count)."""
        if flat is None:
            return None
        sizes = stack.layout.sizes
        return flat.view(len(sizes), sizes[0], *flat.shape[1:])

    def forward(self, stack: Stack, params: list[torch.Tensor], X: torch.Tensor) -> torch.Tensor:
        """The outputs (rows, ...) of the initial models ``params`` on flat inputs (f_init:
        evaluation mode, the initial buffers)."""
        X = self._jobs(stack, X)
        n = X.shape[0]
        buffers = self._buffers(stack, INIT_BUFFER)
        args = as_pair((tuple(params), buffers, X), n, self.pair)
        with self._autocast(X):
            out = self._vmap(lambda p, b, x: self._apply(p, b, x, self.init_module))(*args)
        out = out[:n]
        return out.reshape(-1, *out.shape[2:])

    def loss_and_grads(
        self,
        stack: Stack,
        X: torch.Tensor,
        y: torch.Tensor,
        f0: torch.Tensor | None,
        masks: tuple = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Per-job losses [jobs] and the gradients of each job's loss for its parameters; the
        step updates the stack's running statistics in place. ``masks``: every Dropout call's
        masks [jobs, ...] (``StackDropout.masks``)."""
        leaves = [p.detach().requires_grad_(True) for p in stack.params]

        def one(params, buffers, x, yy, f0j, gamma, ms):
            with self.dropout.applying(ms):
                out = self._apply(params, buffers, x)
            if f0j is not None:
                out = out - f0j
            out = out / gamma
            if self.squeeze:
                out = out.squeeze(-1)
            return self.loss_fn(out, yy)

        in_dims = (0, 0, 0, 0, None if f0 is None else 0, 0, 0)
        X, y, f0 = self._jobs(stack, X), self._jobs(stack, y), self._jobs(stack, f0)
        n = X.shape[0]
        buffers = self._buffers(stack)
        paired = n == 1 and self.pair
        if paired:
            # a pair's buffers are updated in place (BatchNorm): two rows of their own
            buffers = {k: torch.cat([v, v]) for k, v in buffers.items()}
        data = (tuple(leaves), buffers, X, y, f0, stack.data["gamma"], masks)
        args = as_pair(data, n, self.pair)
        with self._autocast(X):
            losses = self._vmap(one, in_dims=in_dims)(*args)[:n]
        if paired:
            for k, v in buffers.items():
                stack.data[BUFFER + k].copy_(v[:1])
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
