"""The ``Store`` interface the runner uses; records are keyed by ``sweep.jobs.key_id``."""

from __future__ import annotations

from abc import ABC, abstractmethod

from modelscape.results.records import JobRecord
from modelscape.store.checkpoints import Checkpoints


class Store(ABC):
    """Records keyed by job key; the last record for a key wins."""

    @abstractmethod
    def add(self, record: JobRecord) -> None:
        """Keep ``record`` (durably, for a persistent store, before returning)."""

    @abstractmethod
    def get(self, key: tuple) -> JobRecord | None:
        """The record of the job with this key, or None if it has not finished."""

    @abstractmethod
    def statuses(self) -> dict[str, str]:
        """``key_id -> status`` of every stored record: what a resumed sweep need not rerun."""

    @property
    def checkpoints(self) -> Checkpoints | None:
        """Where running jobs keep checkpoints, or None when the store does not outlive the
        sweep (then a checkpoint could never be resumed from). ``add`` clears a job's
        checkpoint once its record is kept."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release files and locks."""
