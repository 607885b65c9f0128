"""Datasets: the append-only, versioned Arrow DatasetStore."""

from backpack.data.store import DatasetStore

__all__ = ["DatasetStore"]
