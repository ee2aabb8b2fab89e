"""COMPILE: the stacked kernel step as a CUDA graph, an opt-in for GPUs.

A step of a stack of small jobs on a GPU is a few dozen short kernels, whose launches cost more
than their math. With COMPILE="cuda-graphs" on a CUDA device, the kernel's ``loss_and_grads``
(forward, loss and hand-written backward: everything but the optimizer update, whose Adam step
count changes every step) is captured once per stack as a CUDA graph and replayed each step; the
inputs of an online step are copied into the graph's own before the replay. A stack whose rows
change (jobs exited) is captured again, which takes milliseconds. Replays run the captured
kernels, so the numbers are those of the eager step.

The default, COMPILE="off", is the eager step everywhere: the capture has not yet run on a GPU
(no device was available to validate it against the eager step), so it is not on by default.
On the CPU "cuda-graphs" is the eager step too: ``torch.compile`` of the stacked step was
measured there (benchmarks/NOTES.md) and its compile time never pays back within a sweep.
Capture failures (an op that cannot be captured) fall back to the eager step, saying so once.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

from modelscape.engine.stacked.stack import Stack
from modelscape.engine.tracking import say

Step = Callable[[Stack, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple]
WARMUP = 2  # eager calls on a side stream before a capture, as CUDA graphs require


def step_function(loss_and_grads: Step, mode: str, device: torch.device) -> Step:
    """The kernel step to train with: a CUDA graph replay (COMPILE="cuda-graphs" on CUDA) or
    eager."""
    if mode != "cuda-graphs" or device.type != "cuda":
        return loss_and_grads
    return GraphedStep(loss_and_grads, device)


class GraphedStep:
    """``loss_and_grads`` captured per stack as a CUDA graph and replayed."""

    def __init__(self, loss_and_grads: Step, device: torch.device):
        self.eager = loss_and_grads
        self.device = device
        self.stack: Stack | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.seconds = 0.0

    def __call__(self, stack: Stack, X, y, f0):
        if self.failed:
            return self.eager(stack, X, y, f0)
        if stack is not self.stack:
            self._capture(stack, X, y, f0)
            if self.failed:
                return self.eager(stack, X, y, f0)
        for static, value in zip(self.inputs, (X, y, f0)):
            if static is not None and static.data_ptr() != value.data_ptr():
                static.copy_(value)
        self.graph.replay()
        losses, grads = self.outputs
        # the next replay overwrites the outputs: the window keeps its own copy of the losses
        return losses.clone(), grads

    def _capture(self, stack: Stack, X, y, f0) -> None:
        start = time.perf_counter()
        try:
            # a training set that is part of the stack stays where it is; online batches are
            # copied into the graph's own input tensors before each replay
            own = [v for v in stack.samples.values() if v is not None]
            self.inputs = [
                None if t is None else t if any(t is v for v in own) else t.clone()
                for t in (X, y, f0)
            ]
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP):
                    self.eager(stack, *self.inputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.outputs = self.eager(stack, *self.inputs)
            self.graph, self.stack = graph, stack
        except Exception as err:  # noqa: BLE001 - a step that cannot be captured runs eagerly
            self.failed = True
            say(f"modelscape: COMPILE: the stacked step runs eagerly ({err}).", sys.stderr)
            return
        if self.seconds == 0.0:
            took = time.perf_counter() - start
            say(f"modelscape: COMPILE: stacked step captured as a CUDA graph ({took:.2f} s)")
        self.seconds += time.perf_counter() - start
