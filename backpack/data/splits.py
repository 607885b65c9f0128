"""Which rows of a dataset are held out for evaluation and which ones training may see.

The held-out split is a deterministic hash of the query id, so a prompt is either always evaluated or always
trained on, on every run and in every process (the checks before training, the training dataset itself, the
evaluation and the promotion gate all split with these functions).
"""

from __future__ import annotations

import functools
import hashlib

import pyarrow as pa
import pyarrow.compute as pc

from backpack.data.grounding import keep_for_training
from backpack.data.store import DatasetStore
from backpack.errors import DatasetError


def is_heldout(query_id: str, fraction: float, seed: int = 0) -> bool:
    """Deterministic split: about `fraction` of query ids are held out, the same ones on every run."""
    h = int(hashlib.sha256(f"{seed}:{query_id}".encode()).hexdigest()[:8], 16)
    return h / 2**32 < fraction


def heldout_mask(table, fraction: float) -> pa.Array:
    """Which rows of an Arrow table or batch are held out (by a hash of the query id)."""
    return pa.array([is_heldout(q, fraction) for q in table.column("query_id").to_pylist()], type=pa.bool_())


def split(store: DatasetStore, fraction: float) -> tuple[pa.Table, list[dict]]:
    """(rows not held out as a table, held-out answered rows as dicts) of the store's latest version.
    DatasetError when the dataset is empty."""
    table = store.read()
    if table.num_rows == 0:
        raise DatasetError(f"dataset {store.uri} is empty: run `backpack generate` first")
    held = heldout_mask(table, fraction)
    return table.filter(pc.invert(held)), [r for r in table.filter(held).to_pylist() if r["status"] == "ok"]


def training_rows(batch, fraction: float, grounded_only: bool = False):
    """The rows of an Arrow batch that training may see: answered, not held out for evaluation and, with
    `grounded_only` (mental.train_on: grounded), not an answer that claims what its recalled context does not say."""
    keep = pc.and_(pc.equal(batch.column("status"), "ok"), pc.invert(heldout_mask(batch, fraction)))
    if grounded_only and "context" in batch.column_names:
        grounded = [keep_for_training(a, c) for a, c in zip(batch.column("text").to_pylist(),
                                                            batch.column("context").to_pylist())]
        keep = pc.and_(keep, pa.array(grounded, type=pa.bool_()))
    return batch.filter(keep)


def training_dataset(store: DatasetStore, fraction: float, grounded_only: bool = False):
    """The Ray Dataset training reads: the store's trainable rows, filtered on Arrow batches (not row by row)
    and materialized in the object store first. A batch run reads its data once this way, and the training
    steps then share no CPU with Ray Data's read and filter tasks (on a small machine they slowed every step)."""
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its plans and progress are not the run's news
    return store.to_ray_dataset().map_batches(functools.partial(training_rows, fraction=fraction,
                                                                grounded_only=grounded_only),
                                              batch_format="pyarrow").materialize()
