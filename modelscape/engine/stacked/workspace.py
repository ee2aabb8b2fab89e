"""A stack's reusable buffers, and their per-segment views, for the MLP kernel's products.

Each step of a stack runs the same matrix products on tensors of the same shapes: the
parameters (updated in place), the training set (offline) and the products' outputs. Making
their per-segment views ([jobs, n, ...] slices of the flat sample layout, ``stack.Segment``)
and the output buffers once per stack, instead of every step, takes the Python and allocation
work out of the step; on small stacks that work was about a third of a step. A buffer is
rewritten every step, so what a step returns from one (the gradients) is consumed within the
step, as the optimizer does. The workspace lives as long as its stack: a stack that loses rows
(``Stack.take``) gets a new one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from modelscape.engine.stacked.stack import Stack


class Workspace:
    """Buffers and views of one stack, by tag."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.segments = stack.layout.segments
        self._buffers: dict[Hashable, torch.Tensor] = {}
        self._views: dict[Hashable, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def buffer(self, tag: Hashable, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialized tensor of ``shape`` (``like``'s dtype and device), the same one at
        every call with this tag; every element of it is written before it is read."""
        buf = self._buffers.get(tag)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype:
            buf = self._buffers[tag] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def views(
        self,
        tag: Hashable,
        t: torch.Tensor,
        per_job: bool = False,
        fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Each segment's part of ``t``: [jobs, n, ...] of a flat tensor, or [jobs, ...] of a
        per-job one (``per_job``), passed through ``fn`` (a transpose, say). Made again only
        when ``t`` is another tensor than last time."""
        entry = self._views.get(tag)
        if entry is None or entry[0] is not t:
            if per_job:
                views = [t[s.jobs] for s in self.segments]
            else:
                views = [s.view(t) for s in self.segments]
            entry = (t, views if fn is None else [fn(v) for v in views])
            self._views[tag] = entry
        return entry[1]
