"""How a stack computes its jobs' losses and gradients: the model kernels.

``MLPKernel`` runs the built-in MLP with MSE or cross-entropy loss, under every
PARAMETRIZATION, as batched matmuls with a hand-written backward pass (its activations come
from ``KERNEL_ACTIVATIONS``: one entry per activation; its losses from ``losses``);
``FuncKernel`` runs any other model through ``torch.func`` (``vmap`` over ``functional_call``,
in ``func_kernel``) with autograd. ``kernel_for`` says which one a job takes.
``ops.bmm``/``ops.baddbmm``/``as_pair`` keep a job's numbers independent of how many jobs share
its stack. Both take the samples flat (see ``stack.Layout``); only ``MLPKernel`` takes a stack
whose jobs differ in N_SAMPLES.
"""

from __future__ import annotations

import torch
from torch import nn

from modelscape.engine.setup import Problem
from modelscape.engine.stacked.func_kernel import FuncKernel
from modelscape.engine.stacked.losses import kernel_loss
from modelscape.engine.stacked.ops import KERNEL_ACTIVATIONS, baddbmm, bmm, per_segment
from modelscape.engine.stacked.stack import Layout, Segment, Stack
from modelscape.engine.stacked.workspace import Workspace
from modelscape.models import parametrize
from modelscape.models.builtin import MLP


def kernel_for(problem: Problem) -> type[MLPKernel] | type[FuncKernel]:
    """The kernel a stack of this job's model trains with (the same for every job of a group)."""
    return MLPKernel if MLPKernel.check(problem) else FuncKernel


class MLPKernel:
    """The built-in MLP with one of ``losses``' losses as batched matmuls, with its backward
    pass written out.

    Autograd is skipped because, for small models, its bookkeeping costs more than the math.
    Parametrized layers (``ParametrizedLinear``) compute ``g * (W x + b)`` with each job's own
    multiplier ``g``; GAMMA divides the output. The samples are flat along ``stack.layout``:
    the matmuls run once per segment (jobs with the same N_SAMPLES), the rest once per stack.
    ``compute``: the matmuls' dtype under PRECISION="bf16-mixed" (their operands are cast to
    it, as autocast does; gradients come back in the parameters' dtype).
    """

    name = "mlp"

    def __init__(self, p0: Problem, names: list[str], compute: torch.dtype | None = None):
        model = p0.model
        loss = kernel_loss(p0)
        if loss is None:
            raise ValueError(f"MLPKernel.check refuses this job's {type(p0.loss_fn).__name__}")
        self.loss = loss
        self.act = KERNEL_ACTIVATIONS[type(model.nonlin)](model.nonlin)
        self.compute = compute
        self._ws: Workspace | None = None
        index = {n: i for i, n in enumerate(names)}
        prefixes = (
            ["input_layer"]
            + [f"hidden_layers.{k}" for k in range(len(model.hidden_layers))]
            + ["output_layer"]
        )
        modules = _linears(model)
        # (weight index, bias index or None, whether the layer has a multiplier)
        self.layers = [
            (index[f"{p}.weight"], index.get(f"{p}.bias"), type(m) is not nn.Linear)
            for p, m in zip(prefixes, modules)
        ]

    @staticmethod
    def check(problem: Problem) -> bool:
        """Whether this kernel computes exactly what the job's model and loss do."""
        model = problem.model
        return (
            type(model) is MLP
            and kernel_loss(problem) is not None
            and type(model.nonlin) in KERNEL_ACTIVATIONS
            and (type(model.nonlin) is not parametrize.ScaledReLU or model.nonlin.gain > 0)
            and all(type(m) in _LINEARS for m in _linears(model))
            and not _has_hooks(model)
        )

    def samples(self, problems: list[Problem], layout: Layout) -> dict[str, torch.Tensor | None]:
        """What the kernel multiplies by, per sample ([rows, 1], for ``Stack.samples``): each
        layer's multiplier (None for plain layers), 1/GAMMA's divisor (None when every GAMMA
        is 1: dividing by 1 is exact) and the loss's per-job gradient factor (MSE's 2/(N d_out),
        cross-entropy's 1/N)."""
        p0 = problems[0]
        like = next(p0.model.parameters())
        out: dict[str, torch.Tensor | None] = {}
        for k, (_, _, has) in enumerate(self.layers):
            if not has:
                out[f"g{k}"] = None
                continue
            mods = [_linears(p.model)[k] for p in problems]
            out[f"g{k}"] = layout.per_sample(torch.stack([m.multiplier for m in mods]).to(like))
        gammas = [p.gamma for p in problems]
        gamma = torch.tensor(gammas, dtype=like.dtype, device=like.device)
        out["gamma"] = None if all(g == 1.0 for g in gammas) else layout.per_sample(gamma)
        sizes = torch.tensor(layout.sizes, dtype=torch.float64, device=like.device)
        out["scale"] = layout.per_sample(self.loss.scale(p0, sizes).to(like.dtype))
        return out

    def _mm(
        self,
        layout: Layout,
        a: torch.Tensor,
        W: torch.Tensor,
        b,
        transpose: bool,
        ws=None,
        tag=None,
    ):
        """Per segment: a @ W.mT (+ b) (``transpose``) or a @ W, into one flat tensor (with a
        workspace ``ws``: into its buffer ``tag``, with the views it keeps)."""
        width = W.shape[1] if transpose else W.shape[2]
        if ws is not None:
            out = ws.buffer(tag, (a.shape[0], width), a)
            outs, ins = ws.views(tag, out), ws.views((tag, "a"), a)
            Ws = ws.views((tag, "W"), W, per_job=True, fn=_mT if transpose else None)
            if b is None:
                for s, x, w, o in zip(ws.segments, ins, Ws, outs):
                    bmm(x, w, s.pair, out=o)
            else:
                bs = ws.views((tag, "b"), b, per_job=True, fn=_column)
                for s, x, w, c, o in zip(ws.segments, ins, Ws, bs, outs):
                    baddbmm(c, x, w, s.pair, out=o)
            return out
        if self.compute is not None:
            a, W = a.to(self.compute), W.to(self.compute)
            b = None if b is None else b.to(self.compute)

        def product(s: Segment, out: torch.Tensor | None) -> torch.Tensor:
            Ws = W[s.jobs].mT if transpose else W[s.jobs]
            if b is None:
                return bmm(s.view(a), Ws, s.pair, out=out)
            return baddbmm(b[s.jobs, None], s.view(a), Ws, s.pair, out=out)

        return per_segment(layout, (a.shape[0], width), a, product)

    def _forward(
        self, stack: Stack, params: list[torch.Tensor], X: torch.Tensor, keep: bool, ws=None
    ):
        layout, factors = stack.layout, stack.samples
        h = X if X.dim() == 2 else X.reshape(X.shape[0], -1)
        saved = [h]
        last = len(self.layers) - 1
        for k, (wi, bi, _) in enumerate(self.layers):
            b = None if bi is None else params[bi]
            z = self._mm(layout, h, params[wi], b, True, ws, ("z", k))
            if factors[f"g{k}"] is not None:
                # a workspace buffer is this step's own: scaled in place, the same numbers
                g = factors[f"g{k}"]
                z = z.mul_(g) if ws is not None else z * g
            if k == last:
                return z, saved
            if self.act.saves_input and keep:
                saved.append(z)
            h = self.act.forward(z)
            if keep:
                saved.append(h)
        raise AssertionError("an MLP has a readout layer")

    def forward(self, stack: Stack, params: list[torch.Tensor], X: torch.Tensor) -> torch.Tensor:
        """The outputs [rows, d_out] of the stacked models ``params`` on flat inputs."""
        return self._forward(stack, params, X, keep=False)[0]

    def loss_and_grads(
        self, stack: Stack, X: torch.Tensor, y: torch.Tensor, f0: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Per-job losses [jobs] and the gradients of each job's loss for its parameters."""
        params, layout, factors = stack.params, stack.layout, stack.samples
        ws = self._workspace(stack)
        f, saved = self._forward(stack, params, X, keep=True, ws=ws)
        out = f if f0 is None else f - f0
        if factors["gamma"] is not None:
            out = out / factors["gamma"]
        losses, g = self.loss(layout, out, y, factors["scale"])
        if factors["gamma"] is not None:
            g = g / factors["gamma"]
        grads: list[torch.Tensor | None] = [None] * len(params)
        gh = g  # the gradient of the current layer's output (first: the readout's)
        for k in range(len(self.layers) - 1, -1, -1):
            wi, bi, _ = self.layers[k]
            W = params[wi]
            gz = gh
            if k < len(self.layers) - 1:
                h_out = saved.pop()  # this layer's output; below it, its input (pre-activation)
                gz = self.act.backward(
                    gh.to(h_out.dtype), saved.pop() if self.act.saves_input else h_out
                )
            if factors[f"g{k}"] is not None:
                gz = gz * factors[f"g{k}"]
            h_in = saved[-1]
            if ws is not None:
                grads[wi], gb, gh = self._backward_into(ws, k, gz, h_in, W, bi is not None)
                if bi is not None:
                    grads[bi] = gb
                continue
            grads[wi] = self._weight_grad(layout, gz, h_in, W)
            if bi is not None:
                grads[bi] = per_segment(
                    layout,
                    params[bi].shape,
                    gz,
                    lambda s, out, gz=gz: torch.sum(s.view(gz), 1, out=out),
                    per_job=True,
                )
            if k > 0 and W.shape[1] == 1:
                # an outer product (one output) is faster as a broadcast multiply
                gh = per_segment(
                    layout,
                    (gz.shape[0], W.shape[2]),
                    gz if gz.dtype == torch.promote_types(gz.dtype, W.dtype) else W,
                    lambda s, out, gz=gz, W=W: torch.mul(s.view(gz), W[s.jobs], out=out),
                )
            elif k > 0:
                gh = self._mm(layout, gz, W, None, False)
        return losses, grads

    def _workspace(self, stack: Stack) -> Workspace | None:
        """The stack's workspace (made at its first step); None under bf16-mixed, whose
        operands are cast copies made every step."""
        if self.compute is not None:
            return None
        if self._ws is None or self._ws.stack is not stack:
            self._ws = Workspace(stack)
        return self._ws

    def _backward_into(self, ws: Workspace, k: int, gz, h_in, W, bias: bool):
        """Layer ``k``'s weight gradient, bias gradient (``bias``) and, above the readin, the
        gradient of its input, each into a workspace buffer: what ``loss_and_grads`` computes
        without one, in the same order and rounding."""
        segments, gzs = ws.segments, ws.views(("gz", k), gz)
        gw = ws.buffer(("gw", k), W.shape, gz)
        for s, g, h, o in zip(
            segments, gzs, ws.views(("h", k), h_in), ws.views(("gw", k), gw, True)
        ):
            bmm(g.mT, h, s.pair, out=o)
        gb = None
        if bias:
            gb = ws.buffer(("gb", k), (W.shape[0], W.shape[1]), gz)
            for g, o in zip(gzs, ws.views(("gb", k), gb, per_job=True)):
                torch.sum(g, 1, out=o)
        gh = None
        if k > 0 and W.shape[1] == 1:
            # an outer product (one output) is faster as a broadcast multiply
            gh = ws.buffer(("gh", k), (gz.shape[0], W.shape[2]), gz)
            Ws = ws.views(("gh", k, "W"), W, per_job=True)
            for g, w, o in zip(gzs, Ws, ws.views(("gh", k), gh)):
                torch.mul(g, w, out=o)
        elif k > 0:
            gh = self._mm(ws.stack.layout, gz, W, None, False, ws, ("gh", k))
        return gw, gb, gh

    def _weight_grad(self, layout: Layout, gz, h_in, W) -> torch.Tensor:
        """Per segment gz.mT @ h_in: each job's weight gradient, in the weight's dtype."""
        if self.compute is not None:
            gz, h_in = gz.to(self.compute), h_in.to(self.compute)
        grad = per_segment(
            layout,
            W.shape,
            gz,
            lambda s, out: bmm(s.view(gz).mT, s.view(h_in), s.pair, out=out),
            per_job=True,
        )
        return grad.to(W.dtype)


_LINEARS = (nn.Linear, parametrize.ParametrizedLinear)


def _linears(model: MLP) -> list[nn.Module]:
    """The MLP's linear layers, readin first, readout last."""
    return [model.input_layer, *model.hidden_layers, model.output_layer]


def _has_hooks(model: nn.Module) -> bool:
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules()
    )


def _mT(t: torch.Tensor) -> torch.Tensor:
    return t.mT


def _column(t: torch.Tensor) -> torch.Tensor:
    return t[:, None]
