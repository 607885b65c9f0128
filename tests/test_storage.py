"""A run whose storage.path is an object store: RunFiles against a real S3 API (moto's server on 127.0.0.1),
then a whole tiny distillation, its resume and `backpack status` with every durable file in the bucket."""

import json

import pytest

from backpack.config import validate_config
from backpack.data.storage import RunFiles, join_uri, local_folder, sibling
from backpack.run.evaluate import evaluate
from backpack.run.generate import generate
from backpack.run.train import train
from backpack.student.checkpoints import latest_checkpoint

from conftest import EXAMPLES, run_main


def test_uri_paths_keep_their_options():
    uri = "s3://b/runs?endpoint_override=h:9&scheme=http"
    assert join_uri(uri, "r", "/dataset/") == "s3://b/runs/r/dataset?endpoint_override=h:9&scheme=http"
    assert sibling(join_uri(uri, "train/metrics.jsonl"), "freshness.jsonl") == \
        "s3://b/runs/train/freshness.jsonl?endpoint_override=h:9&scheme=http"
    assert join_uri("/data/runs", "r", "dataset") == "/data/runs/r/dataset"
    assert sibling("/data/runs/train/metrics.jsonl", "f.jsonl") == "/data/runs/train/f.jsonl"


def test_run_files_on_s3(s3, tmp_path, monkeypatch):
    files = RunFiles(join_uri(s3, "unit"))
    assert not files.local and not files.exists("a.txt") and files.read_text("a.txt") is None
    files.write_text("a/b.txt", "one")
    files.append_text("logs/m.jsonl", "1\n")
    files.append_text("logs/m.jsonl", "2\n")  # no append on S3: read and rewritten
    assert files.read_text("a/b.txt") == "one" and files.read_text("logs/m.jsonl") == "1\n2\n"
    (tmp_path / "src" / "deep").mkdir(parents=True)
    (tmp_path / "src" / "w.bin").write_bytes(b"\x00\x01")
    (tmp_path / "src" / "deep" / "s.json").write_text("{}")
    files.upload(tmp_path / "src", "ckpt/v1")
    assert files.glob("ckpt", ".json") == ["ckpt/v1/deep/s.json"] and files.exists("ckpt/v1/w.bin")
    monkeypatch.setenv("BACKPACK_CACHE", str(tmp_path / "cache"))
    got = local_folder(files.uri("ckpt/v1"))
    assert (got / "w.bin").read_bytes() == b"\x00\x01" and (got / "deep" / "s.json").read_text() == "{}"
    assert local_folder(files.uri("ckpt/v1")) == got  # downloaded once, then the cached copy
    import pickle

    assert pickle.loads(pickle.dumps(files)).read_text("a/b.txt") == "one"  # travels to actors and workers
    with pytest.raises(FileNotFoundError, match="nothing at"):
        local_folder(files.uri("ckpt/v9"))


def test_a_lease_object_excludes_a_second_holder_until_released_or_expired(s3, tmp_path):
    import time

    from backpack.errors import DatasetError
    from backpack.runtime.lease import LeaseHeld, StorageLease

    files = RunFiles(join_uri(s3, tmp_path.name))
    path = files.path("x.lease")
    first = StorageLease(files.fs, path, "first", ttl_s=1.5, settle_s=0.05)
    second = StorageLease(files.fs, path, "second", ttl_s=1.5, settle_s=0.05)
    first.try_acquire()
    with pytest.raises(LeaseHeld, match="held by first"):
        second.try_acquire()
    first.release()
    second.try_acquire()  # released: free at once
    time.sleep(1.6)
    first.try_acquire()   # expired without renewal: free
    with pytest.raises(DatasetError, match="lost the lease"):
        second.check()    # the fence a writer checks before it writes
    with pytest.raises(LeaseHeld):
        second.acquire(wait_s=0.3)


def test_the_run_lock_holds_across_machines_when_storage_is_remote(s3, tmp_path):
    """Two drivers of one run on two machines (two storage.local_path: each its own flock) with the run's
    files in one bucket: the second is refused while the first runs, and starts once it has ended."""
    from backpack.errors import InputError
    from backpack.runtime.session import run_lock

    def cfg(machine):
        return validate_config({"name": "shared", "teachers": [{"name": "t", "model": "default"}],
                                "prompts": {"path": str(EXAMPLES / "prompts.jsonl")},
                                "storage": {"path": join_uri(s3, tmp_path.name),
                                            "local_path": str(tmp_path / machine)}})
    with run_lock(cfg("a")):
        with pytest.raises(InputError, match="run 'shared' is already running: .* held by run 'shared'"):
            with run_lock(cfg("b")):
                pass
    with run_lock(cfg("b")):
        pass


@pytest.mark.integration
def test_distillation_with_its_files_in_an_object_store(ray_session, smol_dir, tiny_model_dir, tmp_path, s3,
                                                         monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory (a folder named "s3:" was the bug)
    # a cache of its own, so the worker downloads what it resumes from; the teacher is the converted default
    # model's folder (the default by name would convert its GGUF again into that empty cache)
    monkeypatch.setenv("BACKPACK_CACHE", str(tmp_path / "cache"))
    data = {
        "name": "objs", "storage": {"path": s3, "local_path": str(tmp_path / "work")},
        "teachers": [{"name": "smol", "model": smol_dir, "replicas": 1, "batch_size": 6, "threads": 2, "num_cpus": 1}],
        "prompts": {"path": str(EXAMPLES / "prompts.jsonl"), "limit": 12},
        "decoding": {"max_new_tokens": 8, "logprobs": 2},
        "student": {"base": tiny_model_dir, "mode": "full"},
        "training": {"num_workers": 1, "cpus_per_worker": 1, "batch_size": 4, "max_steps": 2, "checkpoint_every": 2,
                     "log_every": 1, "lr": 1e-3, "top_k": 2},
        "eval": {"heldout_fraction": 0.3, "max_rows": 3, "max_new_tokens": 6},
    }
    cfg = validate_config(data)
    assert generate(cfg).ok_rows == 12
    assert train(cfg)["versions"] == [1]
    report = evaluate(cfg)
    assert [v["version"] for v in report["versions"]] == [0, 1]

    files = RunFiles(join_uri(s3, "objs"))
    assert files.exists("dataset/manifest.json") and files.glob("dataset/shards", ".parquet")
    ckpt = latest_checkpoint(files)
    assert ckpt is not None and ckpt[1] == 2 and ckpt[0].startswith("s3://runs-bucket/runs/objs/train/")
    assert files.exists("students/v1/trainable.safetensors")
    meta = json.loads(files.read_text("students/v1/version.json"))
    assert meta["path"] == files.uri("students/v1")
    assert [json.loads(x)["step"] for x in files.read_text("train/metrics.jsonl").splitlines()] == [1, 2]
    assert "| 1 | 2 |" in files.read_text("report/report.md") and files.exists("report/report.png")
    assert files.glob("eval", ".json")  # the per-version evaluations, reused by a rerun
    # this machine holds only what cannot live in a bucket: the lock and the embedded Redis's files
    assert list(tmp_path.glob("s3*")) == [] and not (tmp_path / "runs").exists()
    assert {p.name for p in cfg.run_dir.iterdir()} <= {".lock", "redis"}

    # a higher budget resumes from the checkpoint in the bucket (downloaded by the worker)
    more = train(cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_steps": 4,
                                                                                    "checkpoint_every": 4})}))
    assert more["step"] == 4 and more["versions"] == [2]
    assert latest_checkpoint(files)[1] == 4

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(json.dumps(data))
    status = run_main(capsys, "status", str(cfg_file), "--json")
    assert status.returncode == 0, status.stderr
    s = json.loads(status.stdout)
    assert s["run_dir"] == files.uri() and s["trainer"]["step"] == 4 and s["dataset"]["rows"] == 12
