"""What a sweep tells its user while it runs: the one progress bar (jobs done over all jobs,
ETA, jobs/s, the latest job's losses, failures, workers) and ``notice`` lines on stderr."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from typing import TextIO

from tqdm.auto import tqdm  # a widget bar in notebooks, a text bar in terminals

from modelscape.results.records import JobRecord


def notice(text: str) -> None:
    """Tell the user something about the sweep: one ``modelscape: ...`` line on stderr."""
    print(f"modelscape: {text}", file=sys.stderr)


def placement_text(devices: Sequence[str]) -> str:
    """``["cuda:0", "cuda:0", "cpu"]`` -> ``"cuda:0x2 cpu"``: the device of each worker."""
    counts = Counter(devices)
    return " ".join(d if n == 1 else f"{d}x{n}" for d, n in counts.items())


class Progress:
    """A tqdm bar over every job of the sweep; jobs finished in an earlier run count as done.

    The bar writes to ``file`` (stderr by default).
    """

    def __init__(
        self,
        total: int,
        done: int,
        placement: str,
        *,
        enabled: bool = True,
        file: TextIO | None = None,
    ):
        self.failures = 0
        self.placement = placement
        self.latest: JobRecord | None = None  # the latest job that trained (ok or diverged)
        self._bar = tqdm(
            total=total,
            initial=done,
            desc="jobs",
            unit="job",
            disable=not enabled,
            dynamic_ncols=True,
            file=file,
        )
        self._bar.set_postfix_str(self._postfix(), refresh=False)

    def _postfix(self) -> str:
        counts = f"failed={self.failures}, workers: {self.placement}"
        if self.latest is None:
            return counts
        # a failed job has no losses, so the bar keeps showing the latest job that had some
        return f"train={self.latest.train_loss:.3g} test={self.latest.test_loss:.3g}, {counts}"

    def update(self, record: JobRecord) -> None:
        if record.status == "failed":
            self.failures += 1
        else:
            self.latest = record
        self._bar.set_postfix_str(self._postfix(), refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
