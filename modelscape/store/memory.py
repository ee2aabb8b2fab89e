"""``MemoryStore``: a sweep's records in memory, for its lifetime (SAVE_DIR=None)."""

from __future__ import annotations

from modelscape.results.records import JobRecord
from modelscape.store.base import Store
from modelscape.sweep.jobs import key_id


class MemoryStore(Store):
    """Records in memory for the sweep's lifetime (SAVE_DIR=None)."""

    def __init__(self) -> None:
        self._records: dict[tuple, JobRecord] = {}

    def add(self, record: JobRecord) -> None:
        self._records[record.key] = record

    def get(self, key: tuple) -> JobRecord | None:
        return self._records.get(key)

    def records(self) -> list[JobRecord]:
        return list(self._records.values())

    def statuses(self) -> dict[str, str]:
        return {key_id(k): r.status for k, r in self._records.items()}

    def close(self) -> None:
        """Nothing to release: the records stay readable."""
