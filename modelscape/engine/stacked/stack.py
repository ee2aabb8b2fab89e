"""The stacked state of jobs training together: every tensor with a leading job dimension.

``Stack`` holds the running jobs' parameters, optimizer state (slots), per-job optimizer
settings and data; ``take`` drops the rows of jobs that exited (and reorders rows, when jobs
join a running stack). ``Unbatchable`` is how the
stacked engine says, before training, that a group cannot share a stack.

Samples are laid out flat: the training samples (and everything per sample) of every job of
the stack lie in one (rows, ...) tensor, job after job, jobs sorted by their sample count.
``Layout`` says where each job's rows are; the jobs with the same count form a ``Segment``,
whose rows are one [jobs, n, ...] view, so a stack of jobs with different N_SAMPLES needs no
padding: its matrix products run per segment, everything elementwise once for the stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

BUFFER = "buffer:"  # prefix of a module buffer's name in Stack.data
INIT_BUFFER = "init-buffer:"  # the same for the initial model's buffers (online centering)


class Unbatchable(Exception):
    """This group cannot train as one stacked model; the message says why."""


@dataclass(frozen=True)
class Segment:
    """Stack rows ``start:stop`` all have ``n`` samples, at flat rows ``offset`` on.

    ``pair``: a one-job segment is computed as a broadcast pair (``ops.bmm``).
    """

    start: int
    stop: int
    n: int
    offset: int
    pair: bool

    @property
    def jobs(self) -> slice:
        return slice(self.start, self.stop)

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This segment's rows of a flat (rows, ...) tensor, as [jobs, n, ...]."""
        jobs = self.stop - self.start
        if flat.dim() == 2:  # one strided view instead of a slice and a view: half the cost
            s0, s1 = flat.stride()
            shape = (jobs, self.n, flat.shape[1])
            start = flat.storage_offset() + self.offset * s0
            return flat.as_strided(shape, (self.n * s0, s0, s1), start)
        rows = flat[self.offset : self.offset + jobs * self.n]
        return rows.view(jobs, self.n, *flat.shape[1:])


class Layout:
    """Where each stacked job's samples lie in the flat sample dimension.

    ``sizes[r]``: row ``r``'s sample count, rows sorted by it; ``pairs[r]``: whether row ``r``
    computes a stack of one as a pair (its ``group_cap`` >= 2, so it could share a stack).
    """

    def __init__(self, sizes: Sequence[int], pairs: Sequence[bool]):
        if any(a > b for a, b in zip(sizes, sizes[1:])):
            raise ValueError("a Layout's rows must be sorted by sample count")
        self.sizes, self.pairs = list(sizes), list(pairs)
        self.starts = [0]
        for n in self.sizes:
            self.starts.append(self.starts[-1] + n)
        self.segments: list[Segment] = []
        first = 0
        for r in range(1, len(sizes) + 1):
            if r == len(sizes) or sizes[r] != sizes[first]:
                pair = pairs[first] and r - first == 1
                self.segments.append(Segment(first, r, sizes[first], self.starts[first], pair))
                first = r

    @property
    def n_rows(self) -> int:
        return self.starts[-1]

    def rows_of(self, r: int) -> slice:
        """The flat rows of stack row ``r``."""
        return slice(self.starts[r], self.starts[r + 1])

    def per_sample(self, values: torch.Tensor) -> torch.Tensor:
        """A per-job tensor [jobs] repeated over each job's samples: [rows, 1]."""
        counts = torch.tensor(self.sizes, device=values.device)
        return values.repeat_interleave(counts)[:, None]

    def take(self, keep: Sequence[int]) -> tuple[Layout, list[int]]:
        """The layout of stack rows ``keep`` and the flat rows that hold their samples."""
        index = [i for k in keep for i in range(self.starts[k], self.starts[k + 1])]
        return Layout([self.sizes[k] for k in keep], [self.pairs[k] for k in keep]), index


@dataclass
class Stack:
    """The running jobs' tensors, stacked on a leading job dimension (row ``r`` = ``rows[r]``).

    ``params`` and ``slots`` (optimizer state) change every step; ``hyper`` (per-parameter
    optimizer settings, shaped to broadcast against the parameter), ``data`` (per job) and
    ``samples`` (per sample, flat along ``layout``) do not. ``offsets``: at the stack's step
    ``t``, row ``r`` takes its own step ``t - offsets[r]`` (rows differ when jobs joined a
    running stack or resumed from different steps).
    """

    rows: list[int]
    params: list[torch.Tensor]
    slots: dict[str, list[torch.Tensor]]
    hyper: dict[str, list[torch.Tensor]]
    data: dict[str, torch.Tensor | None]
    samples: dict[str, torch.Tensor | None]
    layout: Layout
    offsets: list[int]
    init: list[torch.Tensor] | None = None  # online centering: the initial parameters

    def __post_init__(self) -> None:
        # whether every row takes the same own step (no row joined at another step)
        self.in_step = all(o == self.offsets[0] for o in self.offsets)

    def take(self, keep: Sequence[int]) -> Stack:
        """The stack of rows ``keep`` (positions in this stack)."""
        device = self.params[0].device
        idx = torch.tensor(list(keep), dtype=torch.long, device=device)
        layout, flat = self.layout.take(keep)
        flat_idx = torch.tensor(flat, dtype=torch.long, device=device)

        def sel(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.index_select(0, idx) for t in ts]

        return Stack(
            rows=[self.rows[k] for k in keep],
            params=sel(self.params),
            slots={k: sel(v) for k, v in self.slots.items()},
            hyper={k: sel(v) for k, v in self.hyper.items()},
            data={k: None if v is None else v.index_select(0, idx) for k, v in self.data.items()},
            samples={
                k: None if v is None else v.index_select(0, flat_idx)
                for k, v in self.samples.items()
            },
            layout=layout,
            offsets=[self.offsets[k] for k in keep],
            init=None if self.init is None else sel(self.init),
        )

    def mutable(self) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]], dict]:
        """Copies of what a step changes (parameters, slots and the module buffers, such as
        BatchNorm's running statistics), to replay a window from."""
        buffers = {
            k: v.clone() for k, v in self.data.items() if k.startswith(BUFFER) and v is not None
        }
        slots = {k: [t.clone() for t in v] for k, v in self.slots.items()}
        return [p.clone() for p in self.params], slots, buffers
