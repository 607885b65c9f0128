"""Data: the append-only, versioned Arrow DatasetStore (Parquet shards + manifest) on any `pyarrow.fs`
filesystem, the run's files (RunFiles), prompt collections, the held-out split and the grounding filter."""

from backpack.data.store import DatasetStore

__all__ = ["DatasetStore"]
