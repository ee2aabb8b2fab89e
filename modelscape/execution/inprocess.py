"""``InProcessExecutor``: trains every group in the calling process, one after another.

The debug executor (nothing is pickled, a debugger stops inside the batch function), and what
EXECUTOR="local" uses when the sweep has one worker in total.
"""

from __future__ import annotations

import torch

from modelscape.engine import train_group
from modelscape.engine.failures import terminal_interrupts
from modelscape.execution.base import Executor, Records
from modelscape.execution.pickling import Payload
from modelscape.store.checkpoints import Checkpoints


class InProcessExecutor(Executor):
    """Train every group in this process, one after another, on ``device``."""

    pickles = False

    def __init__(self, device: torch.device, checkpoints: Checkpoints | None = None):
        super().__init__(checkpoints)
        self.device = device

    def _run(self, payload: Payload, records: Records) -> None:
        # a Ctrl-C stops the sweep; a KeyboardInterrupt raised by user code fails its job
        with terminal_interrupts():
            for gid, group in enumerate(payload.groups):
                for record in train_group(group, payload.spec, self.device, self.checkpoints):
                    records.add(gid, record)

    def placement(self) -> list[str]:
        return [str(self.device)]
