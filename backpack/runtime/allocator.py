"""Which memory allocator settings Ray Train workers run with.

CPU training allocates and frees large, differently sized tensors every step (batches have different lengths;
the logits of one micro-batch are hundreds of MB). glibc's malloc serves every block over 32 MB with its own
mmap and unmaps it on free, and trims the heap's top, so each step faults that memory in again, page by page.
`auto` keeps glibc but tells it to keep what it took (one arena, no mmap for large blocks, no trimming), through
its documented environment variables: no library to install. benchmarks/allocator.py measures it against
glibc's defaults, tcmalloc, mimalloc, jemalloc and tbbmalloc (numbers in benchmarks/README.md): it is the
fastest of them here, tcmalloc second, the other three no faster than glibc's defaults.

The settings must be in place when the worker process starts, so the choice is made on the driver and passed to
the workers as environment variables; a cluster's nodes get the same variables (tcmalloc: the same library path).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

from backpack.errors import InputError

# Debian/Ubuntu: apt install libtcmalloc-minimal4; Fedora/RHEL: gperftools-libs; conda: gperftools.
_TCMALLOC = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# glibc keeping its memory (mallopt(3)'s variables): one arena (the training thread's), large blocks from the
# heap instead of their own mmap (MMAP_MAX 0), the heap's top never given back (a trim threshold of 1 TiB), and
# the heap grown 1 GiB at a time (TOP_PAD: fewer, larger extensions; pages not touched cost no memory).
KEEP_MEMORY = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
               "MALLOC_TOP_PAD_": str(1 << 30)}
_GLIBC_VARS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
               "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def find_tcmalloc() -> Optional[str]:
    """Path of a tcmalloc shared library on this machine (the system's or the active conda env's), or None."""
    dirs = list(_DIRS)
    if os.environ.get("CONDA_PREFIX"):
        dirs.insert(0, os.path.join(os.environ["CONDA_PREFIX"], "lib"))
    for d in dirs:
        for name in _TCMALLOC:
            if (Path(d) / name).is_file():
                return str(Path(d) / name)
    try:  # other layouts: ask the dynamic linker's cache
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if "tcmalloc" in line and "=>" in line and "debug" not in line:
            return line.split("=>")[-1].strip()
    return None


def worker_env(allocator: str, environ: Optional[dict] = None) -> dict[str, str]:
    """Environment variables for a training worker process, for `training.allocator`: "auto" keeps glibc's
    malloc with the KEEP_MEMORY settings, "tcmalloc" preloads tcmalloc (an error when the machine lacks it),
    "system" leaves glibc's malloc as it is, but with one arena. A user's own LD_PRELOAD or glibc malloc
    variables win."""
    environ = os.environ if environ is None else environ
    if environ.get("LD_PRELOAD"):
        return {"LD_PRELOAD": environ["LD_PRELOAD"]}
    own = {k: environ[k] for k in _GLIBC_VARS if environ.get(k)}
    if own:
        return own
    if allocator == "tcmalloc":
        path = find_tcmalloc()
        if not path:
            raise InputError("training.allocator='tcmalloc' but no tcmalloc library was found on this machine: "
                             "install it (Debian/Ubuntu: apt install libtcmalloc-minimal4) or set "
                             "training.allocator=auto")
        return {"LD_PRELOAD": path}
    if allocator == "auto":
        return dict(KEEP_MEMORY)
    return {"MALLOC_ARENA_MAX": "1"}


def loaded_allocator() -> str:
    """The allocator this process runs with: "tcmalloc" if it is loaded (read from /proc/self/maps), "glibc
    (keeps memory)" under the KEEP_MEMORY settings, else "glibc"."""
    try:
        with open("/proc/self/maps") as f:
            if "tcmalloc" in f.read():
                return "tcmalloc"
    except OSError:  # not Linux
        pass
    keeps = all(os.environ.get(k) == v for k, v in KEEP_MEMORY.items())
    return "glibc (keeps memory)" if keeps else "glibc"
