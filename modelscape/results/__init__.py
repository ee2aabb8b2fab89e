"""What a sweep returns: one ``JobRecord`` per job (``records``), the ``Result`` built from them
(``result``), expt-core traces (``trace``) and plots (``plotting``).

The package re-exports ``result``'s names, where ``modelscape.results`` had them before it
became a package, so pickled ``Result`` objects keep loading.
"""

from modelscape.results.result import (
    ExptTrace,
    JobRecord,
    Result,
    Status,
    scalar_grab,
    trace_key,
)

__all__ = [
    "JobRecord",
    "Result",
    "Status",
    "ExptTrace",
    "scalar_grab",
    "trace_key",
]
