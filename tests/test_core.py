"""Pure core: schema round trips, routing policies, manifest logic, placement checks, prompt reading."""

import json

import pyarrow as pa
import pytest

from backpack.core.resources import Group, multi_node_problems, placement_problems
from backpack.core.schema import (DATASET_SCHEMA, QUERY_SCHEMA, check_dataset_table, completions_to_table, failed_table,
                                  queries_to_table, table_to_queries)
from backpack.core.types import Completion, DecodingParams, Query
from backpack.data.manifest import Manifest
from backpack.data.prompts import read_prompts
from backpack.errors import InputError
from backpack.scheduling.routing import ReplicaView, can_ever_serve, least_loaded, round_robin

# ------------------------------------------------------------------ schema


def _queries(count=3, **dec):
    return [Query(messages=[{"role": "user", "content": f"prompt {i}"}], decoding=DecodingParams(**dec),
                  task="t") for i in range(count)]


def test_query_ids_are_content_hashes():
    a, b = _queries(2)
    assert a.id != b.id
    assert a.id == Query(messages=a.messages, task="t").id
    assert a.id != Query(messages=a.messages, task="t", decoding=DecodingParams(temperature=0.5)).id


def test_query_table_round_trip():
    qs = _queries(3, temperature=0.7, seed=5, n=2, logprobs=3)
    t = queries_to_table(qs)
    assert t.schema.equals(QUERY_SCHEMA, check_metadata=False)
    back = table_to_queries(t)
    assert [(q.id, q.messages, q.decoding, q.task) for q in back] == [(q.id, q.messages, q.decoding, q.task) for q in qs]


def test_completions_join_queries_and_keep_logprobs():
    qs = _queries(2)
    cs = [Completion(qs[0].id, "teach", text="hi", token_ids=[5, 6], token_logprobs=[-0.1, -0.2],
                     top_ids=[[5, 1], [6, 2]], top_logprobs=[[-0.1, -3.0], [-0.2, -2.5]]),
          Completion.failed(qs[1].id, "teach", "boom")]
    t = completions_to_table(qs, cs)
    assert t.schema.equals(DATASET_SCHEMA, check_metadata=False)
    rows = t.to_pylist()
    assert rows[0]["completion_tokens"] == 2 and rows[0]["top_ids"] == [[5, 1], [6, 2]]
    assert rows[0]["messages"] == qs[0].messages
    assert rows[1]["status"] == "failed" and rows[1]["error"] == "boom" and rows[1]["finish_reason"] == "error"


def test_failed_table_and_schema_check():
    t = failed_table(queries_to_table(_queries(3)), "x", "no replica")
    assert t.num_rows == 3 and set(t.column("status").to_pylist()) == {"failed"}
    with pytest.raises(ValueError, match="missing"):
        check_dataset_table(t.drop_columns(["text"]))


# ------------------------------------------------------------------ routing


def views(*in_flight, alive=None, teachers=None):
    return [ReplicaView(f"r{i}", (teachers or ["a"] * len(in_flight))[i], in_flight=f, max_in_flight=2,
                        alive=True if alive is None else alive[i]) for i, f in enumerate(in_flight)]


def test_round_robin_cycles_and_skips_full_dead_and_excluded():
    v = views(0, 0, 0)
    assert [round_robin(v, last) for last in (-1, 0, 1, 2)] == [0, 1, 2, 0]
    v = views(2, 0, 0, alive=[True, False, True])
    assert round_robin(v, -1) == 2                       # r0 full, r1 dead
    assert round_robin(v, -1, exclude=frozenset({"r2"})) is None
    assert round_robin(views(0, 0, teachers=["a", "b"]), -1, teacher="b") == 1


def test_least_loaded_prefers_emptiest_then_least_served():
    v = views(1, 0, 1)
    assert least_loaded(v) == 1
    v = views(0, 0)
    v[0].served = 5
    assert least_loaded(v) == 1
    assert least_loaded(views(2, 2)) is None


def test_can_ever_serve():
    v = views(2, 2, alive=[True, False])
    assert can_ever_serve(v, None, frozenset())          # r0 is full but alive
    assert not can_ever_serve(v, None, frozenset({"r0"}))
    assert not can_ever_serve(v, "other", frozenset())


# ------------------------------------------------------------------ manifest


def test_manifest_versions_and_since():
    m = Manifest()
    assert m.version == 0
    m.add("s1", rows=3, ok=2, failed=1, teachers={"a": 3})
    m.add("s2", rows=2, ok=2, failed=0, teachers={"a": 1, "b": 1})
    assert m.version == 2
    assert [s.path for s in m.since(1)] == ["s2"]
    assert [s.path for s in m.upto(1)] == ["s1"]
    assert m.summary() == {"version": 2, "shards": 2, "rows": 5, "ok": 4, "failed": 1, "teachers": {"a": 4, "b": 1}}
    back = Manifest.from_json(m.to_json())
    assert back.summary() == m.summary()
    with pytest.raises(ValueError, match="does not exist"):
        m.upto(3)


def test_manifest_rejects_gaps():
    m = Manifest()
    m.add("s1", 1, 1, 0, {})
    data = json.loads(m.to_json())
    data["shards"][0]["version"] = 2
    with pytest.raises(ValueError, match="versions"):
        Manifest.from_json(json.dumps(data))


# ------------------------------------------------------------------ placement


def test_placement_reports_required_vs_available():
    nodes = [{"CPU": 2.0, "memory": 1e9}]
    assert placement_problems([("t0", {"CPU": 1}), ("t1", {"CPU": 1})], nodes) == []
    probs = placement_problems([("t0", {"CPU": 1, "GPU": 1})], nodes)
    assert len(probs) == 1 and "GPU=1" in probs[0] and "short of GPU" in probs[0]
    # enough in total, but no single node fits the 3-CPU replica
    probs = placement_problems([("big", {"CPU": 3})], [{"CPU": 2}, {"CPU": 2}])
    assert "big needs CPU=3 on one node" in probs[0]
    assert placement_problems([("t", {"teacher": 1})], [{"CPU": 4}])[0].endswith("(short of teacher)")


def test_placement_groups_by_strategy():
    nodes = [{"CPU": 2, "teacher": 1}, {"CPU": 2, "teacher": 1}, {"CPU": 2, "trainer": 1}]
    two = (({"CPU": 1, "teacher": 1},) * 2)
    # one replica per teacher node fits spread; packed on one node it does not (each node has teacher=1)
    assert placement_problems([], nodes, [Group("teacher 'a'", two, "strict_spread")]) == []
    probs = placement_problems([], nodes, [Group("teacher 'a'", two, "strict_pack")])
    assert len(probs) == 1 and "teacher 'a' packs 2 replica(s) on one node" in probs[0] and "teacher=2" in probs[0]
    # strict_spread over more nodes than can take a bundle: names how many could
    three = ({"CPU": 1},) * 4
    probs = placement_problems([], nodes, [Group("teacher 'b'", three, "strict_spread")])
    assert "only 3 node(s) can take one" in probs[0]
    # CPU-only bundles pack on one node when it is big enough
    assert placement_problems([], [{"CPU": 4}, {"CPU": 1}], [Group("w", ({"CPU": 2},) * 2, "strict_pack")]) == []
    # pack / spread are preferences: checked bundle by bundle, and strict groups take their nodes first
    assert placement_problems([("solo", {"CPU": 2})], [{"CPU": 2}, {"CPU": 2}],
                              [Group("g", ({"CPU": 2},), "strict_pack")]) == []
    probs = placement_problems([("solo", {"CPU": 2, "trainer": 1})], nodes, [Group("g", two, "spread")])
    assert probs == []
    probs = placement_problems([("x", {"trainer": 1})], nodes, [Group("g", ({"CPU": 2, "trainer": 1},), "pack")])
    assert "short of trainer" in probs[0]


def test_multi_node_refuses_driver_local_state():
    assert multi_node_problems(None, "runs", False, 1) == []            # one node: embedded Redis, local folder
    probs = multi_node_problems(None, "runs", False, 3)
    assert len(probs) == 2 and probs[0].startswith("redis.url: not set") and "3 nodes" in probs[0]
    assert probs[1].startswith("storage.path: 'runs' may be a folder of this machine only")
    assert "storage.shared: true" in probs[1]
    assert multi_node_problems("redis://h:6379/0", "/nfs/runs", True, 3) == []


# ------------------------------------------------------------------ prompts


def test_read_prompts_good_and_bad(tmp_path):
    p = tmp_path / "p.jsonl"
    lines = [
        json.dumps({"id": "a", "prompt": "Hello", "task": "greet"}),
        json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}),
        json.dumps({"id": "c", "prompt": "   "}),                        # empty
        "{not json",                                                    # malformed
        json.dumps({"id": "e", "prompt": "x" * 50}),                    # too long
        json.dumps({"id": "f", "prompt": "hi", "colour": 1}),           # unknown field
        json.dumps({"id": "a", "prompt": "dup"}),                       # duplicate id
        json.dumps({"id": "h", "prompt": "sampled", "decoding": {"temperature": 0.5, "seed": 3}}),
        "",
    ]
    p.write_bytes(("\n".join(lines)).encode() + b"\n" + b'{"id": "g", "prompt": "caf\xe9"}\n')
    qs, bad = read_prompts(p, DecodingParams(), default_task="dflt", max_chars=40)
    assert [q.id for q in qs][0] == "a" and qs[0].task == "greet"
    assert qs[1].task == "dflt" and qs[1].messages[0]["role"] == "system"
    assert qs[2].id == "h" and qs[2].decoding.temperature == 0.5 and qs[2].decoding.seed == 3
    reasons = {b.query.id: b.reason for b in bad}
    assert "empty prompt" in reasons["rejected:c"]
    assert "not valid JSON" in reasons["rejected:p.jsonl line 4"]
    assert "over the limit of 40" in reasons["rejected:e"]
    assert "unknown field" in reasons["rejected:f"]
    assert "duplicate id 'a'" in reasons["rejected:a"]
    assert "not valid UTF-8 (byte 0xe9" in reasons["rejected:p.jsonl line 10"]
    assert len(qs) + len(bad) == 9


def test_read_prompts_limit_parquet_and_empty_file(tmp_path):
    import pyarrow.parquet as pq

    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "task": ["x", None, "z"]}), p)
    qs, bad = read_prompts(p, DecodingParams(), limit=2)
    assert [q.messages[0]["content"] for q in qs] == ["a", "b"] and qs[1].task == "default" and not bad
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match="holds no prompts"):
        read_prompts(empty, DecodingParams())
    with pytest.raises(InputError, match="not found"):
        read_prompts(tmp_path / "missing.jsonl", DecodingParams())


def test_shipped_prompt_collection_is_clean():
    from conftest import EXAMPLES

    qs, bad = read_prompts(EXAMPLES / "prompts.jsonl", DecodingParams())
    assert not bad and len(qs) >= 200
    assert len({q.messages[-1]["content"] for q in qs}) == len(qs)
    assert len({q.task for q in qs}) >= 5


def test_prompt_records_too_deep_or_not_unicode_are_rejected_with_a_reason(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = ['{"prompt": ' + "[" * 50_000 + "]" * 50_000 + "}", '{"prompt": "fine", "id": "\\ud800"}',
             '{"prompt": "fine too"}']
    path.write_text("\n".join(lines) + "\n")
    queries, rejected = read_prompts(path, DecodingParams())
    assert [q.messages[-1]["content"] for q in queries] == ["fine too"]
    assert "nested too deeply" in rejected[0].reason and "not valid Unicode" in rejected[1].reason
