"""Choice of the training workers' memory allocator (pure logic; the trainer test checks it reaches workers)."""

import os

import pytest

from backpack.errors import InputError
from backpack.runtime import allocator
from backpack.runtime.allocator import find_tcmalloc, loaded_allocator, worker_env


def test_found_library_is_a_file_or_none():
    path = find_tcmalloc()
    assert path is None or os.path.isfile(path)


def test_auto_preloads_tcmalloc_when_found(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
    assert worker_env("auto", environ={}) == {"LD_PRELOAD": "/lib/libtcmalloc_minimal.so.4"}
    assert worker_env("tcmalloc", environ={}) == {"LD_PRELOAD": "/lib/libtcmalloc_minimal.so.4"}
    # glibc on request, with one arena (the loop runs on a worker thread)
    assert worker_env("system", environ={}) == {"MALLOC_ARENA_MAX": "1"}


def test_without_tcmalloc(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    assert worker_env("auto", environ={}) == {"MALLOC_ARENA_MAX": "1"}
    assert worker_env("auto", environ={"MALLOC_ARENA_MAX": "4"}) == {"MALLOC_ARENA_MAX": "4"}
    with pytest.raises(InputError, match="training.allocator='tcmalloc'.*libtcmalloc-minimal4"):
        worker_env("tcmalloc", environ={})


def test_users_preload_wins(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/lib/libtcmalloc.so.4")
    assert worker_env("auto", environ={"LD_PRELOAD": "/opt/libjemalloc.so"}) == {"LD_PRELOAD": "/opt/libjemalloc.so"}


def test_this_process_reports_what_it_loaded():
    assert loaded_allocator() in ("tcmalloc", "system")
