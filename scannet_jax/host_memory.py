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

Every page the kernel hands out is zero-filled on its first touch, and on some hosts a fault is
expensive: on a 2-core AMD EPYC virtual machine (Zen 5) the SCANN+ train step on 128 QM9 molecules
took 177,711 minor faults and 332 ms of system CPU time per step, and 395 ms wall. Two settings
remove that cost (docs/performance.md, "Page faults"):

* `keep_freed_memory`: one arena (XLA's worker threads otherwise allocate in per-thread arenas
  that trim themselves), no ``mmap`` for large blocks, no trimming, so the next step reuses the
  pages the last one freed. The cost is a higher peak RSS (freed blocks stay mapped and the single
  heap fragments). A config asks for it (``config.keep_freed_host_memory``); it is a ``mallopt``
  made before JAX creates its CPU client (the arena limit is fixed when the first thread arena is
  made), so the command line (`scannet_jax.cli`) makes it after reading the config and before it
  imports the trainer; library users call it first themselves.
* Transparent huge pages for the heap (`restart_with_huge_pages`): glibc's
  ``glibc.malloc.hugetlb=1`` tunable makes malloc ``madvise(MADV_HUGEPAGE)`` what it maps, so the
  kernel faults in 2 MiB at a time where its THP mode is ``madvise`` (the common default) or
  ``always``. glibc reads tunables only when a process starts, from ``GLIBC_TUNABLES``, so the
  command line's entry point re-executes itself once with the variable added; library users set
  it in their environment (`huge_page_environment` gives it).

``SCANNET_JAX_MALLOC=system`` in the environment leaves the allocator as it is (both settings).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

# mallopt(3) parameters, glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
OPT_OUT_VARIABLE = "SCANNET_JAX_MALLOC"
# mallopt's value is an int; glibc stores the trim threshold as a size_t, so -1 is SIZE_MAX: never
# trim. (2**31 - 1, the largest positive int, is too small: an ALIGNN step frees more than 2 GiB.)
NEVER_TRIM = -1

_applied = False


def _left_as_it_is(environ: Mapping[str, str]) -> bool:
    """True where no setting of this module applies: opted out, or a C library other than glibc."""
    return environ.get(OPT_OUT_VARIABLE, "") == "system" or platform.libc_ver()[0] != "glibc"


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
    if _left_as_it_is(os.environ):
        return False
    libc = ctypes.CDLL("libc.so.6")
    for name, param, value in (("M_ARENA_MAX", M_ARENA_MAX, 1), ("M_MMAP_MAX", M_MMAP_MAX, 0),
                               ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, NEVER_TRIM)):
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"host_memory: glibc's mallopt({name}, {value}) failed")
    _applied = True
    return True


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_page_environment(environ: Mapping[str, str] | None = None,
                          thp_mode_file: Path = THP_MODE_FILE) -> dict[str, str] | None:
    """``environ`` (default ``os.environ``) with ``glibc.malloc.hugetlb=1`` added to ``GLIBC_TUNABLES``.

    Returns None where starting a process with it would change nothing: glibc's hugetlb tunable
    already set (to any value), ``SCANNET_JAX_MALLOC=system``, a C library other than glibc, or a
    kernel without transparent huge pages (no ``thp_mode_file``, or its mode ``[never]``).
    """
    env = dict(os.environ if environ is None else environ)
    tunables = env.get("GLIBC_TUNABLES", "")
    if _left_as_it_is(env) or "glibc.malloc.hugetlb=" in tunables:
        return None
    try:
        mode = thp_mode_file.read_text()
    except OSError:
        return None
    if "[never]" in mode:
        return None
    env["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
    return env


def restart_with_huge_pages() -> None:
    """Re-executes this process (same interpreter, same arguments) under `huge_page_environment`.

    Returns without doing anything where that environment is None, which it is in the restarted
    process, so this restarts at most once. Call it first thing, before any work or output.
    """
    env = huge_page_environment()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
