"""Local files that survive a power loss and that other users of the machine cannot read.

A rename is atomic, but it is durable only once the directory that holds the new name is flushed too: without
that, a power loss after an acknowledgement can bring back the old directory entry (no shard, old manifest).
Run folders and the embedded Redis' folder are created 0700 (the AOF holds every prompt and answer; redis.conf
the password), whatever the umask.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_dirs(path: str | os.PathLike) -> Path:
    """Create `path` and any missing parents, each new one mode 0700 (existing folders are left as they are)."""
    p = Path(path).expanduser().absolute()
    missing = []
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, PRIVATE_DIR)
        except FileExistsError:  # made meanwhile by another writer
            continue
        os.chmod(d, PRIVATE_DIR)  # the umask may have narrowed 0700; never widened it
    return Path(path).expanduser().absolute()


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (new names, renames) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Write a whole file: a temporary name beside it (created with `mode`), flushed, renamed into place, the
    folder flushed. A reader sees the old file or the new one, and after a power loss the new one stays."""
    target = Path(path)
    private_dirs(target.parent)
    tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
