"""DatasetStore: append-only, versioned Arrow datasets as Parquet shards plus a JSON manifest.

Layout under the dataset root (a local path or any `pyarrow.fs` URI):

    manifest.json                      versions, shard paths, row counts, per-teacher counts
    shards/part-000001-<uid>.parquet   one shard per version, schema `DATASET_SCHEMA`

A write goes shard first (to a temporary name, flushed, then renamed), manifest last (the same way), so a crash
at any point leaves the previous manifest intact and never points at a half-written shard; locally the folder
is flushed after each rename, so an acknowledged append survives a power loss. Writers take a lock around the
read-modify-write of the manifest, so two of them (a driver's leftover actors and a new run's, two machines)
both land their shards: `manifest.lock` (an flock) locally, the lease object `manifest.lease` on an object store
(see backpack.runtime.lease), checked again just before the manifest is written, with the manifest's version
(its generation) re-read to be the one extended. Any number of readers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid
from collections import Counter
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from backpack.core.schema import DATASET_SCHEMA, check_dataset_table, with_added_columns
from backpack.core.types import OK
from backpack.data.manifest import Manifest, ShardEntry
from backpack.data.storage import RunFiles
from backpack.errors import DatasetError
from backpack.runtime.lease import StorageLease

MANIFEST = "manifest.json"
SHARDS = "shards"
LOCK = "manifest.lock"
LEASE = "manifest.lease"
APPEND_WAIT_S = 120.0  # how long an append waits for another writer's lease before it fails


class DatasetStore:
    """A versioned dataset of teacher Completions. Version N is the first N shards."""

    def __init__(self, root: str | os.PathLike, create: bool = True):
        self.uri = str(root)
        self.files = RunFiles(self.uri)
        self.fs, self.root, self._local = self.files.fs, self.files.path(), self.files.local
        if not self.files.exists(MANIFEST):
            if not create:
                raise DatasetError(f"no dataset at {self.uri!r} (no {MANIFEST} there)")
            self.files.make_dir(SHARDS)
            with self._writer_lock():
                if not self.files.exists(MANIFEST):
                    self._write_manifest(Manifest())

    def _p(self, rel: str) -> str:
        return self.files.path(rel)

    # ------------------------------------------------------------ manifest

    def manifest(self) -> Manifest:
        # An object store's input stream reads in ranges: a read that overlaps the writer replacing the manifest
        # can mix the old and new object. Such a read does not parse; reading again gets one whole version.
        attempts = 1 if self._local else 4
        for attempt in range(attempts):
            try:
                with self.fs.open_input_stream(self._p(MANIFEST)) as f:
                    return Manifest.from_json(f.read().decode("utf-8"))
            except (ValueError, KeyError, TypeError) as e:
                if attempt + 1 == attempts:
                    raise DatasetError(f"corrupt manifest at {self._p(MANIFEST)!r}: {e}") from None
                time.sleep(0.25 * (attempt + 1))

    @property
    def version(self) -> int:
        return self.manifest().version

    @contextlib.contextmanager
    def _writer_lock(self):
        """Held around a manifest update: an flock locally; on an object store a lease object (yielded, so the
        writer checks it is still held right before the write it protects)."""
        if not self._local:
            lease = StorageLease(self.fs, self._p(LEASE), what=f"an append to {self.uri}", ttl_s=60.0,
                                 settle_s=0.3)
            lease.acquire(APPEND_WAIT_S)
            try:
                yield lease
            finally:
                lease.release()
            return
        with open(self._p(LOCK), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield None
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _write_manifest(self, manifest: Manifest) -> None:
        self.files.write_bytes(MANIFEST, manifest.to_json().encode("utf-8"))

    # ------------------------------------------------------------ writing

    def append(self, table: pa.Table) -> Optional[ShardEntry]:
        """Append `table` (DATASET_SCHEMA) as one new shard and version. Returns its entry (None if empty)."""
        table = check_dataset_table(table)
        if table.num_rows == 0:
            return None
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        status = table.column("status").to_pylist()
        teachers = Counter(table.column("teacher").to_pylist())
        with self._writer_lock() as lease:  # the manifest read here is the one this append extends
            manifest = self.manifest()
            rel = f"{SHARDS}/part-{manifest.version + 1:06d}-{uuid.uuid4().hex[:8]}.parquet"
            self.files.write_bytes(rel, sink.getvalue().to_pybytes())
            entry = manifest.add(rel, rows=table.num_rows, ok=status.count(OK),
                                 failed=len(status) - status.count(OK), teachers=dict(teachers))
            if lease is not None:  # the fence: still ours, and nobody wrote a version meanwhile
                lease.check()
                if self.manifest().version != entry.version - 1:
                    raise DatasetError(f"{self.uri}: the manifest changed during an append (a writer without "
                                       "the lease): this shard was not added; append it again")
            self._write_manifest(manifest)
        return entry

    # ------------------------------------------------------------ reading

    def shard_paths(self, entries: list[ShardEntry]) -> list[str]:
        return [self._p(e.path) for e in entries]

    def _read(self, entries: list[ShardEntry], columns: Optional[list[str]] = None) -> pa.Table:
        schema = DATASET_SCHEMA if columns is None else pa.schema([DATASET_SCHEMA.field(c) for c in columns])
        if not entries:
            return schema.empty_table()
        tables = [self._read_shard(p, columns, schema) for p in self.shard_paths(entries)]
        return pa.concat_tables(tables).cast(schema)

    def _read_shard(self, path: str, columns: Optional[list[str]], schema: pa.Schema) -> pa.Table:
        try:
            table = pq.read_table(path, filesystem=self.fs, columns=columns)
        except (pa.ArrowInvalid, KeyError):  # a shard written before a column existed: read what it has
            have = set(pq.read_schema(path, filesystem=self.fs).names)
            table = pq.read_table(path, filesystem=self.fs, columns=[c for c in schema.names if c in have])
        return with_added_columns(table, schema).select(schema.names)

    def read(self, version: Optional[int] = None, columns: Optional[list[str]] = None) -> pa.Table:
        """The dataset at `version` (None = latest) as one Arrow table."""
        try:
            entries = self.manifest().upto(version)
        except ValueError as e:
            raise DatasetError(f"{self.uri}: {e}") from None
        return self._read(entries, columns)

    def shards_since(self, version: int) -> list[ShardEntry]:
        """Shard entries added after `version`."""
        return self.manifest().since(version)

    def read_since(self, version: int, columns: Optional[list[str]] = None) -> pa.Table:
        """Rows added after `version`, as one table."""
        return self._read(self.shards_since(version), columns)

    def query_status(self) -> dict[str, str]:
        """Each stored query id -> "ok" if any of its rows succeeded, else "failed"."""
        t = self.read(columns=["query_id", "status"])
        out: dict[str, str] = {}
        for qid, status in zip(t.column("query_id").to_pylist(), t.column("status").to_pylist()):
            if out.get(qid) != OK:
                out[qid] = status
        return out

    def answered_ids(self) -> set[str]:
        """Query ids that already have a successful Completion (a rerun skips them)."""
        return {q for q, s in self.query_status().items() if s == OK}

    def to_ray_dataset(self, version: Optional[int] = None, since: Optional[int] = None):
        """The dataset (at `version`, or only the shards added after `since`) as a Ray Dataset."""
        import ray.data

        m = self.manifest()
        entries = m.since(since) if since is not None else m.upto(version)
        if not entries:
            return ray.data.from_arrow(DATASET_SCHEMA.empty_table())
        return ray.data.read_parquet(self.shard_paths(entries), filesystem=self.fs)
