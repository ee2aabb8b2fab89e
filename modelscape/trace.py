"""Moved to ``modelscape.results.trace``.

This path keeps old imports, pickled results and stored files working."""

from modelscape.results.trace import (
    ExptTrace,
)

__all__ = [
    "ExptTrace",
]
