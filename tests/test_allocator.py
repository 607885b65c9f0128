"""Choice of the training workers' memory allocator settings (the trainer test checks they reach workers)."""

import os
import subprocess
import sys

import pytest

from backpack.errors import InputError
from backpack.runtime import allocator
from backpack.runtime.allocator import KEEP_MEMORY, find_tcmalloc, loaded_allocator, worker_env


def test_found_library_is_a_file_or_none():
    path = find_tcmalloc()
    assert path is None or os.path.isfile(path)


def test_auto_keeps_glibc_memory_and_tcmalloc_on_request(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
    assert worker_env("auto", environ={}) == KEEP_MEMORY
    assert worker_env("tcmalloc", environ={}) == {"LD_PRELOAD": "/lib/libtcmalloc_minimal.so.4"}
    # glibc as it is on request, with one arena (the loop runs on a worker thread)
    assert worker_env("system", environ={}) == {"MALLOC_ARENA_MAX": "1"}


def test_tcmalloc_required_but_missing(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    with pytest.raises(InputError, match="training.allocator='tcmalloc'.*libtcmalloc-minimal4"):
        worker_env("tcmalloc", environ={})


def test_users_own_settings_win():
    assert worker_env("auto", environ={"LD_PRELOAD": "/opt/libjemalloc.so"}) == {"LD_PRELOAD": "/opt/libjemalloc.so"}
    assert worker_env("auto", environ={"MALLOC_ARENA_MAX": "4"}) == {"MALLOC_ARENA_MAX": "4"}
    assert worker_env("tcmalloc", environ={"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}


# A child process mallocs, touches and frees a 64 MiB block, then prints how much of it is still resident.
_KEPT = """
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
before = rss()
p = libc.malloc(64 << 20)
ctypes.memset(p, 1, 64 << 20)
libc.free(ctypes.c_void_p(p))
print(rss() - before)
"""


def _resident_after_free(env: dict) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", _KEPT], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return int(out.stdout)


def test_keep_memory_settings_keep_a_large_freed_block():
    # glibc's defaults give a 64 MiB block back to the kernel at free (its own mmap); auto's settings keep it,
    # so the next step's tensors reuse those pages instead of faulting new ones in
    assert _resident_after_free({}) < 16
    assert _resident_after_free(worker_env("auto", environ={})) >= 60


def test_this_process_reports_what_it_runs_with():
    assert loaded_allocator() in ("tcmalloc", "glibc", "glibc (keeps memory)")
