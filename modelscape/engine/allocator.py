"""Keep freed memory in the process for the next training step (glibc's malloc, on Linux).

A training step frees and allocates the same large temporaries every step: activations,
gradients, a stack's flat buffers, the optimizer's intermediates. glibc maps a buffer above its
mmap threshold fresh each time, and gives the heap's free top back to the system once it
exceeds the trim threshold. Both start at 128 KiB and adapt only to the largest single buffer
freed so far, while a step frees tens of them together, so every step pays page faults for
memory it used a moment before. On the 2-core CI machine that was about 140,000 page faults in
a 500-step width-64 sweep, and a third of its time (``benchmarks/NOTES.md``).

``keep_freed_memory`` sets, once per process, the mmap threshold to 32 MiB (the largest value
glibc's own adaptation reaches) and the trim threshold to 256 MiB: buffers below 32 MiB come
from the heap, and up to 256 MiB of freed heap stays in the process for reuse. glibc cannot
return to its adaptive thresholds once they are set, so this holds for the rest of the process;
code that runs after a sweep in the same process (a notebook's own loop) gets the same reuse.
Other C libraries and preloaded allocators (jemalloc, tcmalloc, which keep freed memory
already) are left alone, and ``MODELSCAPE_MALLOC=default`` in the environment turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_ABOVE = 32 * 2**20  # buffers below this come from the heap, not fresh mappings
TRIM_ABOVE = 256 * 2**20  # free heap above this is returned to the system

_done = False


def keep_freed_memory() -> bool:
    """Set glibc's thresholds (see above) unless done already; whether they are set now."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("MODELSCAPE_MALLOC") == "default":
        return False
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    _done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_ABOVE)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE)
    )
    return _done
