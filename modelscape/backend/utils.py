"""Moved to ``modelscape.compat.utils``.

This path keeps old imports, pickled results and stored files working."""

from modelscape.compat.utils import (
    default_device,
    derive_seed,
    ensure_numpy,
    ensure_torch,
    load_config,
    load_json,
    seed_everything,
    trace_deserialize,
    tuple_to_numpy,
)

__all__ = [
    "ensure_numpy",
    "default_device",
    "ensure_torch",
    "tuple_to_numpy",
    "trace_deserialize",
    "derive_seed",
    "seed_everything",
    "load_json",
    "load_config",
]
