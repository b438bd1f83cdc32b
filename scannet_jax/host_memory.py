"""How the process's C allocator treats the host buffers of XLA's CPU runtime.

XLA's CPU runtime mallocs every execution's buffers anew: a train step's temporaries and outputs
are blocks of tens to hundreds of MiB (SCANN+ on 128 QM9 molecules: [14,336, 128] float32 edge
arrays; ALIGNN on 32 crystals: [86,144, 256] triplet arrays). glibc serves a block above its mmap
threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it when freed, and it returns freed
memory at the top of a heap to the kernel, so each step the kernel zero-fills and faults in the
same pages again (docs/performance.md, "Host memory").

`keep_freed_memory` makes glibc keep them: one arena (XLA's worker threads otherwise allocate in
per-thread arenas that trim themselves), no ``mmap`` for large blocks, no trimming. The next step
reuses the pages the last one freed. The cost is a higher peak RSS (freed blocks stay mapped and
the single heap fragments).

It pays where a step's arrays are larger than glibc's mmap threshold, and only costs RSS where
they are not (SCANN+ on QM9: no change in speed, peak RSS 1.8 -> 2.7-3.2 GB), so a config asks for it
(``config.keep_freed_host_memory``: ALIGNN's recipe). The setting is process-wide and must come
before JAX creates its CPU client (the arena limit is fixed when the first thread arena is made),
so it is made at the program's edge: the command line (`scannet_jax.cli`) reads the config and
calls `keep_freed_memory` before it imports the trainer; library users call it first themselves.
``SCANNET_JAX_MALLOC=system`` in the environment leaves the allocator as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt(3) parameters, glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
OPT_OUT_VARIABLE = "SCANNET_JAX_MALLOC"
# mallopt's value is an int; glibc stores the trim threshold as a size_t, so -1 is SIZE_MAX: never
# trim. (2**31 - 1, the largest positive int, is too small: an ALIGNN step frees more than 2 GiB.)
NEVER_TRIM = -1

_applied = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed host memory in the process for reuse (see the module doc).

    Returns:
      True when the settings are in effect (glibc, not opted out by ``SCANNET_JAX_MALLOC=system``),
      False otherwise (another C library, or opted out): the allocator is left unchanged.

    Raises:
      RuntimeError: glibc refused a setting (mallopt returned 0).
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(OPT_OUT_VARIABLE, "") == "system" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    for name, param, value in (("M_ARENA_MAX", M_ARENA_MAX, 1), ("M_MMAP_MAX", M_MMAP_MAX, 0),
                               ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, NEVER_TRIM)):
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"host_memory: glibc's mallopt({name}, {value}) failed")
    _applied = True
    return True
