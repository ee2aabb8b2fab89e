"""Moved to ``modelscape.results.records``.

This path keeps old imports, pickled results and stored files working."""

from modelscape.results.records import (
    FIELDS,
    PER_JOB,
    SQL_COLUMNS,
    JobRecord,
    Status,
    column,
    default_of,
    hashable,
)

__all__ = [
    "Status",
    "hashable",
    "column",
    "JobRecord",
    "FIELDS",
    "SQL_COLUMNS",
    "PER_JOB",
    "default_of",
]
