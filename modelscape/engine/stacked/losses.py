"""The losses the MLP kernel (``kernels.MLPKernel``) computes by hand, with their gradients.

A loss takes the trained function's outputs ``out`` = (f - f_init) / GAMMA, [rows, d_out],
flat along ``stack.Layout``, and the stacked targets; it returns each job's loss, the mean over
that job's own samples as torch's ``reduction="mean"`` computes it for the job alone, and the
gradient of each job's loss for ``out`` (the kernel divides it by GAMMA for f). That gradient
carries a per-job factor (``scale``: 1/N, with whatever the loss adds), which the kernel keeps
per sample (``Stack.samples``). ``kernel_loss`` says which loss a job's ``loss_fn`` takes;
a loss none of them computes exactly trains through ``FuncKernel``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from modelscape.engine.setup import Problem
from modelscape.engine.stacked.ops import per_segment
from modelscape.engine.stacked.stack import Layout


class KernelLoss(ABC):
    """A loss the MLP kernel computes, per job."""

    @abstractmethod
    def takes(self, problem: Problem) -> bool:
        """Whether this computes exactly the job's ``loss_fn`` on its targets."""

    @abstractmethod
    def scale(self, problem: Problem, sizes: torch.Tensor) -> torch.Tensor:
        """Per job (``sizes``: its sample count, float64), the factor of the output gradient."""

    @abstractmethod
    def __call__(
        self, layout: Layout, out: torch.Tensor, y: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-job losses [jobs] and the gradient [rows, d_out] of each job's loss for its
        rows of ``out`` (``scale``: ``scale``'s factor per sample, [rows, 1])."""


class MSE(KernelLoss):
    """``nn.MSELoss()``: per job, the mean over its samples and outputs of (out - y)^2."""

    def takes(self, problem: Problem) -> bool:
        loss_fn, y = problem.loss_fn, problem.y_te
        return (
            type(loss_fn) is nn.MSELoss
            and loss_fn.reduction == "mean"
            and y.is_floating_point()
            and y.dim() <= 2
        )

    def scale(self, problem: Problem, sizes: torch.Tensor) -> torch.Tensor:
        return 2.0 / (sizes * problem.y_te[0].numel())

    def __call__(self, layout, out, y, scale):
        r = out - y.reshape(out.shape)
        squares = r.square()
        losses = per_segment(
            layout,
            (len(layout.sizes),),
            r,
            lambda s, o: torch.mean(s.view(squares), (1, 2), out=o),
            per_job=True,
        )
        return losses, r * scale


class CrossEntropy(KernelLoss):
    """``nn.CrossEntropyLoss()`` on integer class labels: per job, the mean over its samples
    of -log softmax(out)[y]; the gradient is (softmax(out) - onehot(y)) / N."""

    def takes(self, problem: Problem) -> bool:
        loss_fn, y = problem.loss_fn, problem.y_te
        return (
            type(loss_fn) is nn.CrossEntropyLoss
            and loss_fn.reduction == "mean"
            and loss_fn.weight is None
            and loss_fn.label_smoothing == 0.0
            # a label is a class index (0 or more): a negative ignore_index matches none
            and loss_fn.ignore_index < 0
            and y.dtype == torch.long
            and y.dim() == 1
        )

    def scale(self, problem: Problem, sizes: torch.Tensor) -> torch.Tensor:
        return 1.0 / sizes

    def __call__(self, layout, out, y, scale):
        # as autocast does for cross_entropy: a bf16 output is taken in float32
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        logp = torch.log_softmax(out, 1)
        labels = y[:, None]
        nll = logp.gather(1, labels).neg_()
        losses = per_segment(
            layout,
            (len(layout.sizes),),
            nll,
            lambda s, o: torch.mean(s.view(nll), (1, 2), out=o),
            per_job=True,
        )
        grad = logp.exp_().scatter_add_(1, labels, torch.full_like(nll, -1.0))
        return losses, grad.mul_(scale)


KERNEL_LOSSES: tuple[KernelLoss, ...] = (MSE(), CrossEntropy())


def kernel_loss(problem: Problem) -> KernelLoss | None:
    """The loss the MLP kernel computes for this job, or None when it computes none exactly."""
    return next((loss for loss in KERNEL_LOSSES if loss.takes(problem)), None)
