"""Where results live. ``MemoryStore`` keeps records in memory for the sweep's lifetime."""

from __future__ import annotations

from modelscape.results import JobRecord


class MemoryStore:
    """Records in memory, keyed by job key; the last record for a key wins."""

    def __init__(self) -> None:
        self._records: dict[tuple, JobRecord] = {}

    def add(self, record: JobRecord) -> None:
        self._records[record.key] = record

    def get(self, key: tuple) -> JobRecord | None:
        return self._records.get(key)

    def records(self) -> list[JobRecord]:
        return list(self._records.values())
