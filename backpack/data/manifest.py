"""Manifest logic for the DatasetStore: versions, shard entries and summaries. Pure, no I/O.

Each append to a dataset adds one shard and one version. The manifest is the only source of truth: a shard
file that the manifest does not name (left by a crash between writing the shard and committing the manifest)
is ignored, so readers never see half-written data.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections import Counter
from dataclasses import asdict, dataclass, field

MANIFEST_FORMAT = 1


@dataclass
class ShardEntry:
    version: int                 # the dataset version this shard created
    path: str                    # relative to the dataset root
    rows: int
    ok: int
    failed: int
    teachers: dict[str, int]     # rows per teacher
    created_at: str


@dataclass
class Manifest:
    shards: list[ShardEntry] = field(default_factory=list)
    format: int = MANIFEST_FORMAT
    schema_version: int = 1

    @property
    def version(self) -> int:
        """The current version: 0 for an empty dataset, else the version of the newest shard."""
        return self.shards[-1].version if self.shards else 0

    def add(self, path: str, rows: int, ok: int, failed: int, teachers: dict[str, int]) -> ShardEntry:
        entry = ShardEntry(version=self.version + 1, path=path, rows=rows, ok=ok, failed=failed,
                           teachers=dict(teachers),
                           created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"))
        self.shards.append(entry)
        return entry

    def upto(self, version: int | None) -> list[ShardEntry]:
        """Shards making up `version` (None = latest)."""
        if version is None:
            return list(self.shards)
        if version < 0 or version > self.version:
            raise ValueError(f"version {version} does not exist (latest is {self.version})")
        return [s for s in self.shards if s.version <= version]

    def since(self, version: int) -> list[ShardEntry]:
        """Shards added after `version` (what a continual reader has not seen yet)."""
        return [s for s in self.shards if s.version > version]

    def summary(self) -> dict:
        teachers: Counter = Counter()
        for s in self.shards:
            teachers.update(s.teachers)
        return {
            "version": self.version,
            "shards": len(self.shards),
            "rows": sum(s.rows for s in self.shards),
            "ok": sum(s.ok for s in self.shards),
            "failed": sum(s.failed for s in self.shards),
            "teachers": dict(teachers),
        }

    def to_json(self) -> str:
        return json.dumps({"format": self.format, "schema_version": self.schema_version,
                           "shards": [asdict(s) for s in self.shards]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unsupported manifest format {data.get('format')!r} (expected {MANIFEST_FORMAT})")
        shards = [ShardEntry(**s) for s in data["shards"]]
        versions = [s.version for s in shards]
        if versions != list(range(1, len(shards) + 1)):
            raise ValueError(f"manifest versions are not 1..{len(shards)}: {versions}")
        return cls(shards=shards, format=data["format"], schema_version=data.get("schema_version", 1))
