"""Where a run's files live, and the pure arithmetic of locations: a local folder or a `pyarrow.fs` URI.

The filesystem access itself (RunFiles) is `backpack.data.storage`; these helpers only join and compare
location strings, so the config can say where things are without touching a disk or a bucket.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator

from backpack.config.base import Section
from backpack.core.redact import redact


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def is_remote(location: str | os.PathLike) -> bool:
    """`location` is on a filesystem other than this machine's disk (a URI other than file://)."""
    return is_uri(location) and not str(location).startswith("file://")


def join_uri(root: str, *parts: str) -> str:
    """`root` with `parts` appended to its path; a URI keeps its query string (the filesystem's options)."""
    rel = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    if not rel:
        return root
    if not is_uri(root):
        return os.path.join(root, rel)
    u = urlsplit(root)
    return urlunsplit((u.scheme, u.netloc, u.path.rstrip("/") + "/" + rel, u.query, u.fragment))


def sibling(location: str | os.PathLike, name: str) -> str:
    """The file `name` next to the file at `location` (a local path or a URI)."""
    location = str(location)
    if not is_uri(location):
        return str(Path(location).parent / name)
    u = urlsplit(location)
    return urlunsplit((u.scheme, u.netloc, u.path.rsplit("/", 1)[0] + "/" + name, u.query, u.fragment))


class StorageConfig(Section):
    """Where a run writes its files: `<path>/<name>/` (dataset, checkpoints, student versions, reports)."""

    path: str = Field("runs", description=(
        "root of the run's files: a local folder, or any pyarrow.fs URI such as `s3://bucket/prefix` or "
        "`gs://bucket/prefix` (S3 options in the query string, credentials from the environment)"))
    shared: bool = Field(False, description=(
        "the folder is a mount every node of a multi-node cluster sees at the same place (NFS, or nodes on one "
        "machine); a multi-node run refuses a local folder without it (each node would write its own copy). "
        "An object-store URI is shared by nature"))
    local_path: Optional[str] = Field(None, description=(
        "folder on this machine for what cannot live in an object store (the run lock, the embedded Redis's "
        "files, caches); only used when path is a URI; null: `~/.cache/backpack/work`"))

    @field_validator("path")
    @classmethod
    def _location(cls, v):
        if "://" in v:
            scheme = v.split("://", 1)[0]
            if not scheme or not scheme.replace("+", "").isalnum():
                raise ValueError(f"{v!r} is not a folder nor a URI (scheme://bucket/prefix)")
            if not v.split("://", 1)[1].split("?", 1)[0].strip("/"):
                raise ValueError(f"{v!r} names no bucket or folder after {scheme}://")
            if redact(v) != v:  # the path is printed, and stored in every student version's version.json
                raise ValueError("holds credentials: give them in the environment as pyarrow reads them "
                                 "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...), not in the URI")
        return v

    @property
    def remote(self) -> bool:
        """The files live in an object store or another non-local filesystem (a URI other than file://)."""
        return is_remote(self.path)
