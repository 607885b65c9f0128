"""RunFiles: one run's files on any `pyarrow.fs` filesystem, a local folder or an object store.

A run's durable files (dataset, Ray Train checkpoints, student versions, metrics, reports, evaluations) live
under `<storage.path>/<name>/`, where storage.path is a local folder or a URI: `s3://bucket/prefix`,
`gs://bucket/prefix`, `hdfs://...`, `file:///...`; S3 options go in the query string
(`s3://bucket/runs?endpoint_override=minio:9000&scheme=http`) and credentials come from the environment, as
pyarrow reads them. Every writer goes through RunFiles, so on a cluster no file lands on a node-local path by
accident. Object stores have no append and no directory rename: `append_text` reads and rewrites the object (a
run's logs are small), and a directory is published by writing its files and recording it elsewhere (Redis)
last.

RunFiles is picklable: it travels to Ray actors and Ray Train workers as its root string and resolves the
filesystem where it is used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import pyarrow.fs as pafs

from backpack.config.storage import is_remote, is_uri, join_uri, sibling
from backpack.runtime.local_files import private_dirs, write_durably

__all__ = ["RunFiles", "append_text", "is_remote", "is_uri", "join_uri", "local_folder", "resolve", "run_files",
           "sibling"]


def append_text(location: str | os.PathLike, text: str) -> None:
    """Append to the log file at `location` (a local path or a URI): see RunFiles.append_text."""
    fs, path = resolve(str(location))
    if isinstance(fs, pafs.LocalFileSystem):
        private_dirs(Path(path).parent)
        with open(path, "a") as f:
            f.write(text)
        return
    try:
        with fs.open_input_stream(path) as f:
            old = f.read()
    except FileNotFoundError:
        old = b""
    with fs.open_output_stream(path) as f:
        f.write(old + text.encode("utf-8"))


def resolve(root: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local folder or a URI."""
    if is_uri(root):
        fs, path = pafs.FileSystem.from_uri(root)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))


class RunFiles:
    """The files under one root (a local folder or a URI). Paths given to its methods are relative to it."""

    def __init__(self, root: str | os.PathLike):
        self.root = str(root) if is_uri(str(root)) else os.path.abspath(os.path.expanduser(str(root)))
        self._fs: Optional[tuple[pafs.FileSystem, str]] = None

    @classmethod
    def of(cls, location: "RunFiles | str | os.PathLike") -> "RunFiles":
        """`location` as RunFiles (a RunFiles as it is)."""
        return location if isinstance(location, RunFiles) else cls(location)

    def __getstate__(self):
        return {"root": self.root, "_fs": None}

    def __repr__(self) -> str:
        return f"RunFiles({self.root!r})"

    # ------------------------------------------------------------ where

    @property
    def local(self) -> bool:
        return not is_remote(self.root)

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs = resolve(self.root)
        return self._fs[0]

    def path(self, rel: str = "") -> str:
        """The path of `rel` inside the filesystem (what pyarrow and Ray Train take with `fs`)."""
        self.fs
        base = self._fs[1]
        return f"{base}/{rel.strip('/')}" if rel.strip("/") else base

    def uri(self, rel: str = "") -> str:
        """`rel` as a string that names it on its own: a local path, or a URI with the root's options."""
        return join_uri(self.root, rel)

    def sub(self, rel: str) -> "RunFiles":
        return RunFiles(self.uri(rel))

    # ------------------------------------------------------------ reading

    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> Optional[bytes]:
        """The file's bytes, None if there is no such file."""
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read_text(self, rel: str) -> Optional[str]:
        data = self.read_bytes(rel)
        return None if data is None else data.decode("utf-8")

    def glob(self, rel_dir: str, suffix: str) -> list[str]:
        """Paths (relative to the root) of the files under `rel_dir`, at any depth, whose path ends with
        `suffix`; [] if `rel_dir` does not exist."""
        base = self.path()
        selector = pafs.FileSelector(self.path(rel_dir), recursive=True, allow_not_found=True)
        return sorted(i.path[len(base):].lstrip("/") for i in self.fs.get_file_info(selector)
                      if i.type == pafs.FileType.File and i.path.endswith(suffix))

    # ------------------------------------------------------------ writing

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file: locally to a temporary name, flushed, moved into place and the folder flushed
        (atomic and durable; new folders 0700); on object stores one PUT is atomic already."""
        target = self.path(rel)
        if self.local:
            write_durably(target, data)
            return
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(target) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def append_text(self, rel: str, text: str) -> None:
        """Append to a log file. Locally a real append; on an object store the object is read and rewritten
        (one writer per log: the run's rank-0 trainer or the driver)."""
        append_text(self.uri(rel), text)

    def make_dir(self, rel: str = "") -> None:
        """Create the folder `rel` and its parents: locally private (0700); on an object store a marker, if any."""
        if self.local:
            private_dirs(self.path(rel))
        else:
            self.fs.create_dir(self.path(rel), recursive=True)

    def upload(self, local_dir: str | os.PathLike, rel: str) -> None:
        """Copy the files of a local folder to `rel` (created; files there of the same name replaced)."""
        self.make_dir(rel)
        for item in sorted(Path(local_dir).rglob("*")):
            if item.is_file():
                self.write_bytes(f"{rel}/{item.relative_to(local_dir).as_posix()}", item.read_bytes())

    def download(self, rel: str, local_dir: str | os.PathLike) -> Path:
        """Copy the files under `rel` into a local folder; returns it."""
        out = Path(local_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in self.glob(rel, ""):
            target = out / name[len(rel.strip("/")):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read_bytes(name) or b"")
        return out


def local_folder(location: str | os.PathLike) -> Path:
    """A local folder holding the files at `location` (a local path as it is; a URI downloaded once into a cache
    folder, then reused: student versions and checkpoints never change once written)."""
    if not is_remote(location):
        return Path(resolve(str(location))[1])
    cache = Path(os.environ.get("BACKPACK_CACHE", Path.home() / ".cache" / "backpack")) / "remote"
    target = cache / hashlib.sha256(str(location).encode()).hexdigest()[:24]
    if (target / ".complete").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=cache))
    try:
        RunFiles(location).download("", tmp)
        if not any(tmp.iterdir()):
            raise FileNotFoundError(f"nothing at {location}")
        (tmp / ".complete").write_text(str(location))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def run_files(cfg) -> RunFiles:
    """The durable files of run config `cfg` (a RunConfig): its local folder, or <storage.path>/<name> on the
    storage's filesystem."""
    return RunFiles(cfg.files_root)
