"""Where results live: in memory (``MemoryStore``) or in a run folder (``RunStore``).

``load(SAVE_DIR)`` reads a run folder back as a ``Result``. The runner uses a store only
through the ``Store`` interface (``base.py``); ``describe.py`` says what a run folder records
about its sweep and whether a rerun may resume it.
"""

from modelscape.store.base import Store
from modelscape.store.describe import array_digest, check_compatible, describe_sweep
from modelscape.store.memory import MemoryStore
from modelscape.store.sqlite import RunStore, load
from modelscape.sweep.jobs import key_id

__all__ = [
    "MemoryStore",
    "RunStore",
    "Store",
    "array_digest",
    "check_compatible",
    "describe_sweep",
    "key_id",
    "load",
]
