"""host_memory.keep_freed_memory: large blocks come from the heap and stay there after free.

Each case runs in a fresh interpreter: the setting is process-wide and must not leak into the
test process.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, json, sys
from scannet_jax import host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
applied = host_memory.keep_freed_memory()
again = host_memory.keep_freed_memory()
size = 64 << 20
before = libc.mallinfo2()
block = libc.malloc(size)
ctypes.memset(block, 1, size)
live = libc.mallinfo2()
libc.free(block)
freed = libc.mallinfo2()
print(json.dumps({"applied": applied, "again": again, "size": size,
                  "mmapped_growth": live.hblkhd - before.hblkhd, "heap_live": live.arena,
                  "heap_after_free": freed.arena, "mmapped_after_free": freed.hblkhd - before.hblkhd}))
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and mallinfo2 are glibc's")


def _probe(**env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env=dict(os.environ, **env), capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


@glibc
def test_a_freed_64_mib_block_stays_in_the_heap_for_the_next_step():
    r = _probe(SCANNET_JAX_MALLOC="")
    assert r["applied"] and r["again"]
    assert r["mmapped_growth"] == 0  # served by the heap, not by a fresh mmap
    assert r["heap_live"] >= r["size"]
    assert r["heap_after_free"] == r["heap_live"]  # not trimmed back to the kernel


@glibc
def test_opting_out_leaves_glibc_mapping_and_unmapping_large_blocks():
    r = _probe(SCANNET_JAX_MALLOC="system")
    assert not r["applied"] and not r["again"]
    assert r["mmapped_growth"] >= r["size"]  # glibc's default: a block this size is mmapped
    assert r["mmapped_after_free"] == 0  # and unmapped when freed


CLI_PROBE = r"""
import sys
from scannet_jax import cli, host_memory, train

train.train_and_evaluate = lambda config, workdir: {}  # the flag handling only, no training
try:
    cli.run(["main.py", f"--config={sys.argv[1]}", f"--workdir={sys.argv[2]}"])
except SystemExit:
    pass
print(host_memory._applied)
"""


@glibc
@pytest.mark.parametrize("config, applied", [("mp:e_form,alignn", "True"), ("qm9:homo", "False")])
def test_the_command_line_applies_it_where_the_config_asks(tmp_path, config, applied):
    out = subprocess.run([sys.executable, "-c", CLI_PROBE, config, str(tmp_path / "run")],
                         env=dict(os.environ, SCANNET_JAX_MALLOC=""), capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == applied
