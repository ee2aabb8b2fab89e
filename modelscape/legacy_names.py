"""Moved to ``modelscape.sweep.legacy_names``.

This path keeps old imports, pickled results and stored files working."""

from modelscape.sweep.legacy_names import (
    DEPRECATED_NAMES,
    LEGACY_MODEL_FILE,
    REFUSED_NAMES,
)

__all__ = [
    "DEPRECATED_NAMES",
    "LEGACY_MODEL_FILE",
    "REFUSED_NAMES",
]
