"""Keep freed memory in the process: CPU inference here is bound by page faults, not arithmetic.

glibc hands every large block (a feature map, a convolution's workspace) back to the
kernel when it is freed and maps fresh, zeroed pages for the next one, batch after
batch. On the 2-core machines this project is measured on that costs more than the
convolutions: Lite0's forward went from 46 to 137 images/s with this alone, 223 with
``channels_last`` too (``benchmarks/results/speed.md``). ``tune_allocator`` tells glibc to
serve every block from its heap and never to trim it; the process keeps its peak memory
until it exits, the right trade for a command. A server lives longer than its largest
request: it calls :func:`release_memory` when a large one is done and nothing else is in
flight, so that its memory follows what it holds, not its history. The command line calls
``tune_allocator`` first; library users call it themselves (it changes the whole process).
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
OPT_OUT = "ANOMATUNE_ALLOCATOR"  # =system leaves the allocator as it is


def tune_allocator() -> bool:
    """No mmap for large blocks and no trimming (glibc only); True when applied.

    A no-op, logged, on another C library or when ``ANOMATUNE_ALLOCATOR=system``.
    """
    if os.environ.get(OPT_OUT, "").lower() == "system":
        log.debug("%s=system: allocator left as it is", OPT_OUT)
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's name: no search (find_library runs ldconfig, tens of ms per command)
        applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to tune
        applied = False
    log.debug("allocator %s", "tuned (no mmap, no trim)" if applied else "left as it is (not glibc)")
    return applied


def release_memory() -> bool:
    """Give the heap's free pages back to the kernel (glibc's ``malloc_trim``, which also releases free pages inside
    the heap); True when it released any. A no-op elsewhere."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
