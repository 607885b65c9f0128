"""DatasetStore: append-only versions, crash safety, reads by version and since a version."""

import pyarrow as pa
import pytest

from backpack.core.schema import completions_to_table
from backpack.core.types import Completion, Query
from backpack.data.store import DatasetStore
from backpack.errors import DatasetError


def rows(prefix: str, n: int, teacher="a", failed=0) -> pa.Table:
    qs = [Query(messages=[{"role": "user", "content": f"{prefix}{i}"}]) for i in range(n)]
    cs = [Completion(q.id, teacher, text=f"answer {q.id}", token_ids=[1, 2]) for q in qs[: n - failed]]
    cs += [Completion.failed(q.id, teacher, "bad") for q in qs[n - failed:]]
    return completions_to_table(qs, cs)


def test_append_versions_and_reads(tmp_path):
    s = DatasetStore(tmp_path / "ds")
    assert s.version == 0 and s.read().num_rows == 0
    e1 = s.append(rows("a", 3))
    e2 = s.append(rows("b", 2, teacher="b", failed=1))
    assert (e1.version, e2.version) == (1, 2)
    assert s.append(rows("c", 0)) is None and s.version == 2
    assert s.read().num_rows == 5 and s.read(version=1).num_rows == 3
    assert s.read_since(1).column("teacher").to_pylist() == ["b", "b"]
    assert len(s.answered_ids()) == 4
    summary = s.manifest().summary()
    assert summary["failed"] == 1 and summary["teachers"] == {"a": 3, "b": 2}
    # a second handle (another process) sees the same data
    assert DatasetStore(tmp_path / "ds", create=False).read().equals(s.read())


def test_crash_between_shard_and_manifest_leaves_previous_version(tmp_path, monkeypatch):
    s = DatasetStore(tmp_path / "ds")
    s.append(rows("a", 2))
    before = s.read()

    def crash(manifest):
        raise KeyboardInterrupt("killed before the manifest was written")

    monkeypatch.setattr(s, "_write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        s.append(rows("b", 3))
    fresh = DatasetStore(tmp_path / "ds", create=False)
    assert fresh.version == 1 and fresh.read().equals(before)
    # the orphan shard exists on disk but is not part of any version
    assert len(list((tmp_path / "ds" / "shards").glob("*.parquet"))) == 2


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(DatasetError, match="no dataset"):
        DatasetStore(tmp_path / "nothing", create=False)
    s = DatasetStore(tmp_path / "ds")
    (tmp_path / "ds" / "manifest.json").write_text("{}")
    with pytest.raises(DatasetError, match="corrupt manifest"):
        s.manifest()


def test_rejects_wrong_schema(tmp_path):
    s = DatasetStore(tmp_path / "ds")
    with pytest.raises(ValueError, match="schema"):
        s.append(pa.table({"x": [1]}))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_writers_of_one_dataset_lose_no_shard(tmp_path, where, request):
    """Locally the flock, on an object store the lease object (moto's S3 server) keeps both writers' shards."""
    import threading

    from backpack.data.storage import join_uri

    root = tmp_path / "ds" if where == "local" else join_uri(request.getfixturevalue("s3"), tmp_path.name, "ds")
    DatasetStore(root)
    errors = []

    def writer(name):  # each writer has its own handle, as two processes would
        store = DatasetStore(root)
        try:
            for i in range(12 if where == "local" else 6):
                store.append(rows(f"{name}{i}-", 2))
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=writer, args=(n,)) for n in "xy"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s, n = DatasetStore(root, create=False), 24 if where == "local" else 12
    assert not errors and s.version == n and s.read().num_rows == 2 * n
    assert len(set(s.read(columns=["query_id"]).column("query_id").to_pylist())) == 2 * n


def test_appends_are_durable_and_private(tmp_path, monkeypatch):
    import os

    from backpack.runtime import local_files

    synced = []
    real = local_files.fsync_dir
    monkeypatch.setattr(local_files, "fsync_dir", lambda p: (synced.append(os.path.basename(p)), real(p)))
    s = DatasetStore(tmp_path / "runs" / "r1" / "ds")
    s.append(rows("a", 2))
    assert synced.count("shards") == 1 and synced.count("ds") == 2  # the new shard's name; the manifest twice
    for d in (tmp_path / "runs", tmp_path / "runs" / "r1", tmp_path / "runs" / "r1" / "ds"):
        assert d.stat().st_mode & 0o777 == 0o700, d
