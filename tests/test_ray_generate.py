"""Integration on one shared local Ray session: real teacher actors (SmolLM2), the scheduler actor, the
DatasetStore, the whole `generate` pipeline with its embedded Redis, and a replica killed mid-run."""

import json
import time

import psutil
import pytest

from backpack.config import TeacherConfig, validate_config
from backpack.core.schema import queries_to_table
from backpack.core.types import DecodingParams, Query
from backpack.data.store import DatasetStore
from backpack.errors import ResourceError, TeacherError
from backpack.run.actors import spawn_scheduler
from backpack.run.generate import generate
from backpack.run.pool import TeacherPool

pytestmark = pytest.mark.integration

PROMPTS = ["What is 2 plus 2?", "Name a colour.", "Say hi.", "What is the sun?", "Name an animal.",
           "What is water?", "Name a fruit.", "Count to three.", "What is a cat?", "Name a city."]


def smol(replicas=2, batch_size=2, **kw) -> TeacherConfig:
    return TeacherConfig(name="smol", replicas=replicas, batch_size=batch_size, threads=1, num_cpus=1, **kw)


def query_table(n, max_new_tokens=8):
    return queries_to_table([Query(messages=[{"role": "user", "content": p}],
                                   decoding=DecodingParams(max_new_tokens=max_new_tokens)) for p in PROMPTS[:n]])


def redis_processes_for(path) -> list:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "redis-server" in cmd and str(path) in cmd:
            out.append(p)
    return out


def test_scheduler_spreads_work_over_two_replicas(ray_session, smol_dir, tmp_path):
    pool = TeacherPool([smol()])
    try:
        infos = pool.start()
        assert [i["replica"] for i in infos] == ["smol/0", "smol/1"] and infos[0]["threads"] == 1
        store = DatasetStore(tmp_path / "ds")
        sched = spawn_scheduler(pool.replicas, store, None, policy="round_robin", flush_rows=4)
        # Each actor had Ray serialize an Arrow table as it started (actors.warm_arrow_serialization), not on its
        # first batch: the first one imports pandas and hundreds more modules. (A lambda: Ray ships it by value.)
        loaded = lambda _: "pandas" in __import__("sys").modules  # noqa: E731
        actors = [sched] + [r.actor for r in pool.replicas]
        assert ray_session.get([a.__ray_call__.remote(loaded) for a in actors]) == [True] * 3
        table = query_table(8)
        summary = ray_session.get(sched.run.remote(table))
        assert summary["ok_rows"] == 8 and summary["failed_rows"] == 0 and summary["tokens"] > 0
        data = store.read()
        assert sorted(data.column("query_id").to_pylist()) == sorted(table.column("query_id").to_pylist())
        assert set(data.column("replica").to_pylist()) == {"smol/0", "smol/1"}
        assert store.version >= 2  # streamed in several shards, not one at the end
        # read back through Ray Data, equal to what was generated
        ds = store.to_ray_dataset()
        assert ds.count() == 8
        assert sorted(r["query_id"] for r in ds.take_all()) == sorted(data.column("query_id").to_pylist())
        assert store.to_ray_dataset(since=store.version - 1).count() == store.manifest().shards[-1].rows
    finally:
        pool.shutdown()


def test_replica_killed_mid_run_loses_no_query(ray_session, smol_dir, tmp_path):
    pool = TeacherPool([smol(batch_size=1)])
    try:
        pool.start()
        store = DatasetStore(tmp_path / "ds")
        sched = spawn_scheduler(pool.replicas, store, None, policy="least_loaded", flush_rows=1)
        table = query_table(10, max_new_tokens=12)
        ref = sched.run.remote(table)
        deadline = time.monotonic() + 120
        while store.version < 1 and time.monotonic() < deadline:  # wait for the first answer to land
            time.sleep(0.05)
        ray_session.kill(pool.replicas[0].actor, no_restart=True)
        summary = ray_session.get(ref)
        assert "smol/0" in summary["dead_replicas"]
        data = store.read()
        assert summary["ok_rows"] == 10 and data.num_rows == 10
        assert set(data.column("status").to_pylist()) == {"ok"}
        assert sorted(data.column("query_id").to_pylist()) == sorted(table.column("query_id").to_pylist())
        assert "smol/1" in set(data.column("replica").to_pylist())
    finally:
        pool.shutdown()


def _config(tmp_path, prompts_lines, **over):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b"\n".join(prompts_lines) + b"\n")
    data = {"name": "itest", "storage": {"path": str(tmp_path / "runs")},
            "teachers": [smol().model_dump()], "prompts": {"path": str(prompts)},
            "decoding": {"max_new_tokens": 8, "logprobs": 2}, "scheduler": {"flush_rows": 3}}
    data.update(over)
    return validate_config(data)


def test_generate_pipeline_with_bad_prompts_and_resume(ray_session, smol_dir, tmp_path):
    good = [json.dumps({"id": f"g{i}", "prompt": p}).encode() for i, p in enumerate(PROMPTS[:5])]
    bad = [json.dumps({"id": "empty", "prompt": ""}).encode(), b'{"id": "latin1", "prompt": "caf\xe9"}', b"{oops"]
    cfg = _config(tmp_path, good + bad)
    res = generate(cfg)
    assert (res.queries, res.rejected, res.ok_rows, res.failed_rows, res.skipped) == (5, 3, 5, 3, 0)
    store = DatasetStore(cfg.dataset_dir, create=False)
    data = {r["query_id"]: r for r in store.read().to_pylist()}
    assert {f"g{i}" for i in range(5)} <= set(data)
    assert all(data[f"g{i}"]["status"] == "ok" and len(data[f"g{i}"]["top_ids"][0]) == 2 for i in range(5))
    failed = {k: v["error"] for k, v in data.items() if v["status"] == "failed"}
    assert len(failed) == 3 and any("empty prompt" in e for e in failed.values())
    assert any("not valid UTF-8" in e for e in failed.values()) and any("not valid JSON" in e for e in failed.values())
    assert not redis_processes_for(cfg.run_dir)  # the embedded Redis was stopped
    assert (cfg.run_dir / "redis" / "appendonlydir").exists() or (cfg.run_dir / "redis" / "appendonly.aof").exists()
    version = store.version
    # the same run again resumes: nothing is asked twice, nothing is duplicated
    again = generate(cfg)
    assert (again.queries, again.skipped, again.rejected) == (0, 5, 0) and store.version == version
    # one more prompt: only it is generated
    cfg2 = _config(tmp_path, good + [json.dumps({"id": "new", "prompt": "Name a tree."}).encode()])
    third = generate(cfg2)
    assert (third.queries, third.skipped, third.ok_rows) == (1, 5, 1)


def test_unplaceable_run_is_refused_before_spawning(ray_session, tmp_path):
    cfg = _config(tmp_path, [b'{"prompt": "hi"}'],
                  teachers=[smol(num_gpus=1).model_dump(), smol(resources={"teacher": 1}).model_dump() | {"name": "b"}])
    with pytest.raises(ResourceError) as e:
        generate(cfg)
    assert "GPU" in str(e.value) and "teacher" in str(e.value) and "the cluster has" in str(e.value)
    assert not redis_processes_for(cfg.run_dir)


def test_broken_model_is_clear_and_stops_redis(ray_session, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "not-a-real-architecture"}')
    cfg = _config(tmp_path, [b'{"prompt": "hi"}'], teachers=[smol(model=str(broken)).model_dump()])
    with pytest.raises(TeacherError) as e:
        generate(cfg)
    assert "smol/" in str(e.value) and "cannot load model" in str(e.value) and "broken-model" in str(e.value)
    assert not redis_processes_for(cfg.run_dir)


def test_a_teacher_that_cannot_start_leaves_the_run_to_the_others(ray_session, smol_dir, tmp_path):
    """One of two teachers is down at start (its model does not load): the run goes on with the other, every
    prompt is answered, a prompt that asked for the broken teacher alone is failed naming it, and the incident
    is recorded for `backpack status` (and the report)."""
    from backpack.run.ops import format_status, status

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "not-a-real-architecture"}')
    lines = [json.dumps({"id": f"p{i}", "prompt": p}).encode() for i, p in enumerate(PROMPTS[:4])]
    lines.append(json.dumps({"id": "pinned", "prompt": "Say hi.", "teacher": "down"}).encode())
    down = TeacherConfig(name="down", model=str(broken), threads=1, num_cpus=1)
    cfg = _config(tmp_path, lines, teachers=[smol(replicas=1).model_dump(), down.model_dump()])
    res = generate(cfg)
    assert (res.ok_rows, res.failed_rows) == (4, 1) and list(res.not_started) == ["down/0"]
    assert "could not start" in res.not_started["down/0"] and "cannot load model" in res.not_started["down/0"]
    rows = {r["query_id"]: r for r in DatasetStore(cfg.dataset_dir, create=False).read().to_pylist()}
    assert {rows[f"p{i}"]["teacher"] for i in range(4)} == {"smol"}
    assert rows["pinned"]["status"] == "failed" and "no live replica of teacher 'down'" in rows["pinned"]["error"]
    s = status(cfg)
    assert [i["replica"] for i in s["incidents"]] == ["down/0"]
    assert "down/0" in format_status(s) and "could not start" in format_status(s)


def test_two_teachers_route_by_requested_teacher(ray_session, smol_dir, tiny_model_dir, tmp_path):
    lines = [json.dumps({"id": f"s{i}", "prompt": p, "teacher": "smol"}).encode() for i, p in enumerate(PROMPTS[:3])]
    lines += [json.dumps({"id": f"t{i}", "prompt": p, "teacher": "tiny"}).encode() for i, p in enumerate(PROMPTS[3:6])]
    lines += [json.dumps({"id": f"a{i}", "prompt": p}).encode() for i, p in enumerate(PROMPTS[6:9])]
    tiny = TeacherConfig(name="tiny", model=tiny_model_dir, replicas=1, threads=1, num_cpus=1, batch_size=2)
    cfg = _config(tmp_path, lines, teachers=[smol(replicas=1).model_dump(), tiny.model_dump()])
    res = generate(cfg)
    assert res.ok_rows == 9 and res.failed_rows == 0
    rows = {r["query_id"]: r for r in DatasetStore(cfg.dataset_dir, create=False).read().to_pylist()}
    assert all(rows[f"s{i}"]["teacher"] == "smol" and rows[f"t{i}"]["teacher"] == "tiny" for i in range(3))
    assert rows["s0"]["model_fingerprint"].startswith("gguf-") and rows["t0"]["model_fingerprint"].startswith("dir-")
    assert {rows[f"a{i}"]["teacher"] for i in range(3)} <= {"smol", "tiny"}


def test_one_run_of_a_name_at_a_time(tmp_path):
    from backpack.errors import InputError
    from backpack.runtime.session import run_lock

    cfg = _config(tmp_path, [b'{"prompt": "hi"}'])
    with run_lock(cfg):
        with pytest.raises(InputError, match="already running"):
            generate(cfg)


def test_replicas_reserved_in_a_placement_group(ray_session, smol_dir, tmp_path):
    from ray.util import placement_group_table

    from backpack.runtime.ray_runtime import check_placement

    pool = TeacherPool([smol(placement="strict_pack")])
    # one node: two replicas cannot spread over different nodes, and the check says so before spawning
    spread = TeacherPool([smol(placement="strict_spread")])
    with pytest.raises(ResourceError, match="strict_spread"):
        check_placement(spread.demands(), spread.groups())
    assert pool.demands() == [] and pool.groups()[0].strategy == "strict_pack"
    check_placement(pool.demands(), pool.groups())
    try:
        infos = pool.start()
        node = ray_session.get_runtime_context().get_node_id()
        assert [i["node"] for i in infos] == [node, node]
        pg = pool.placement_groups[0]
        table = placement_group_table(pg)
        assert table["state"] == "CREATED" and table["strategy"] == "STRICT_PACK"
        assert [b for b in table["bundles"].values()] == [{"CPU": 1.0}, {"CPU": 1.0}]
        summary = ray_session.get(spawn_scheduler(pool.replicas, DatasetStore(tmp_path / "ds"), None)
                                  .run.remote(query_table(4)))
        assert summary["ok_rows"] == 4
    finally:
        pool.shutdown()
    assert placement_group_table(pg)["state"] == "REMOVED"
