"""The operations the MLP kernel (``kernels.MLPKernel``) is built from.

``bmm``/``baddbmm`` keep a job's numbers independent of how many jobs share its stack;
``per_segment`` runs an operation once per segment of a ragged sample layout
(``stack.Layout``); ``KERNEL_ACTIVATIONS`` holds the activations the kernel computes by hand,
with their backward passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from modelscape.engine.stacked.stack import Layout, Segment
from modelscape.models import parametrize

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
    # the parametrizations' ReLU: gain * relu(z); autograd takes relu's backward of gain * g
    parametrize.ScaledReLU: lambda m: Activation(
        lambda z: z.relu_().mul_(m.gain),
        lambda g, out: aten.threshold_backward(g * m.gain, out, 0),
        False,
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


def bmm(
    a: torch.Tensor, b: torch.Tensor, pair: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``torch.bmm`` whose result for a job does not depend on how many jobs are stacked.

    With a single job torch computes the product on another path (``mm``/``gemv``), whose
    rounding differs; computing a stack of one as a (broadcast) pair keeps every job's numbers
    the same in any group, so results do not depend on workers, placement or resumption. The
    pair costs twice the work, so it is made only when ``pair`` (``pair_singletons``: the job
    could share a stack, ``group_cap`` >= 2); a job that always trains alone is computed as
    the plain stack of one it always is. ``out``: write the product there (a view into a flat
    activation buffer).
    """
    if pair and a.shape[0] == 1:
        result = torch.bmm(a.expand(2, -1, -1), b.expand(2, -1, -1))[:1]
        return result if out is None else out.copy_(result)
    return torch.bmm(a, b) if out is None else torch.bmm(a, b, out=out)


def baddbmm(
    bias: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    pair: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch.baddbmm`` with the same stack-size independence as ``bmm``."""
    if pair and a.shape[0] == 1:
        two = (bias.expand(2, -1, -1), a.expand(2, -1, -1), b.expand(2, -1, -1))
        result = torch.baddbmm(*two)[:1]
        return result if out is None else out.copy_(result)
    return torch.baddbmm(bias, a, b) if out is None else torch.baddbmm(bias, a, b, out=out)


def per_segment(
    layout: Layout,
    shape: tuple[int, ...] | torch.Size,
    like: torch.Tensor,
    fn: Callable[[Segment, torch.Tensor | None], torch.Tensor],
    per_job: bool = False,
) -> torch.Tensor:
    """``fn(segment, out)`` for every segment of ``layout``, as one tensor of ``shape`` (flat
    over the samples, or over the jobs with ``per_job``) and ``like``'s dtype and device.

    A stack of one sample count uses ``fn``'s result as it is (``out`` None); several segments
    write into views of one buffer (torch's NaN fill of new memory is off while jobs train,
    ``engine.group.deterministic_algorithms``: every element of it is written).
    """
    if len(layout.segments) == 1:
        return fn(layout.segments[0], None).reshape(shape)
    out = torch.empty(shape, dtype=like.dtype, device=like.device)
    for s in layout.segments:
        fn(s, out[s.jobs] if per_job else s.view(out))
    return out
