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

from scannet_jax import host_memory  # importing it changes nothing; the probes apply it

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


def _thp_file(tmp_path, mode: str):
    path = tmp_path / "enabled"
    path.write_text(mode)
    return path


@glibc
def test_huge_page_environment_adds_the_tunable_once_and_keeps_the_others(tmp_path):
    madvise = _thp_file(tmp_path, "always [madvise] never\n")
    env = host_memory.huge_page_environment({"PATH": "/bin"}, madvise)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = host_memory.huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, madvise)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert host_memory.huge_page_environment(env, madvise) is None  # set: the restarted process stops
    assert host_memory.huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, madvise) is None
    assert host_memory.huge_page_environment({"SCANNET_JAX_MALLOC": "system"}, madvise) is None
    assert host_memory.huge_page_environment({}, _thp_file(tmp_path, "[always] madvise never\n")) is not None
    assert host_memory.huge_page_environment({}, _thp_file(tmp_path, "always madvise [never]\n")) is None
    assert host_memory.huge_page_environment({}, tmp_path / "absent") is None


HUGE_PAGE_PROBE = r"""
import ctypes, json, os, sys
from scannet_jax import cli, host_memory

def anon_huge_kib():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])

cli.run = lambda: None  # the entry point's restart only
cli.main()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
before = anon_huge_kib()
size = 64 << 20
ctypes.memset(libc.malloc(size), 1, size)
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "argv": sys.argv[1:],
                  "huge_kib": anon_huge_kib() - before}))
"""


@glibc
@pytest.mark.parametrize("opt_out", ["", "system"])
def test_the_entry_point_restarts_once_with_huge_pages_for_the_heap(opt_out):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", HUGE_PAGE_PROBE, "an-argument"], capture_output=True,
                         text=True, check=True, env=dict(env, SCANNET_JAX_MALLOC=opt_out))
    (line,) = out.stdout.splitlines()  # one process printed: restarted at most once
    r = json.loads(line)
    assert r["argv"] == ["an-argument"]  # the same arguments after the restart
    thp = host_memory.huge_page_environment({}) is not None  # this kernel has transparent huge pages
    if opt_out or not thp:
        assert r["tunables"] is None
    else:
        assert r["tunables"] == "glibc.malloc.hugetlb=1"
        assert r["huge_kib"] >= 32 << 10  # most of the 64 MiB block is in 2 MiB pages
