"""The one progress bar of a sweep: jobs done over all jobs, ETA, jobs/s, failures, workers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from tqdm import tqdm

from modelscape.results import JobRecord


def placement_text(devices: Sequence[str]) -> str:
    """``["cuda:0", "cuda:0", "cpu"]`` -> ``"cuda:0x2 cpu"``: the device of each worker."""
    counts = Counter(devices)
    return " ".join(d if n == 1 else f"{d}x{n}" for d, n in counts.items())


class Progress:
    """A tqdm bar over every job of the sweep; jobs finished in an earlier run count as done."""

    def __init__(self, total: int, done: int, placement: str, *, enabled: bool = True):
        self.failures = 0
        self.placement = placement
        self._bar = tqdm(
            total=total,
            initial=done,
            desc="jobs",
            unit="job",
            disable=not enabled,
            dynamic_ncols=True,
        )
        self._bar.set_postfix_str(self._postfix(), refresh=False)

    def _postfix(self) -> str:
        return f"failed={self.failures}, workers: {self.placement}"

    def update(self, record: JobRecord) -> None:
        self.failures += record.status == "failed"
        self._bar.set_postfix_str(self._postfix(), refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
