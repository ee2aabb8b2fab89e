"""What a job is: the hyperparameter schema (``hparams``), the grid and seeds (``jobs``), what
a sweep shares across its jobs (``spec``), the checks of its data (``checks``) and the identity of
its code (``code_identity``). The bottom layer: it imports nothing above it.

The package re-exports ``spec``'s names, where ``modelscape.sweep`` had them before it became a
package.
"""

from modelscape.sweep.spec import (
    BatchFn,
    SweepSpec,
    accepted_kwargs,
    check_batch,
    check_input_dim,
    load_from_file,
)

__all__ = [
    "BatchFn",
    "load_from_file",
    "accepted_kwargs",
    "SweepSpec",
    "check_batch",
    "check_input_dim",
]
