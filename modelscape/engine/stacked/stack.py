"""The stacked state of jobs training together: every tensor with a leading job dimension.

``Stack`` holds the running jobs' parameters, optimizer state (slots), per-job optimizer
settings and data; ``take`` drops the rows of jobs that exited. ``Unbatchable`` is how the
stacked engine says, before training, that a group cannot share a stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

BUFFER = "buffer:"  # prefix of a module buffer's name in Stack.data


class Unbatchable(Exception):
    """This group cannot train as one stacked model; the message says why."""


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
        """Copies of what a step changes (parameters and slots), to replay a window from."""
        return [p.clone() for p in self.params], {
            k: [t.clone() for t in v] for k, v in self.slots.items()
        }
