"""The prompt intake stream in a real Redis, and the streaming scheduler over it (fake replicas, real store):
acknowledgement after storage, re-delivery after a crash, de-duplication, backpressure, shards by age."""

import asyncio
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from backpack.data.store import DatasetStore
from backpack.errors import InputError
from backpack.runtime.redis_server import RunKeys
from backpack.scheduling.intake import GROUP, Intake, IntakeSource, backlog
from backpack.scheduling.scheduler import Scheduler
from tests.test_scheduler import FakeReplica

RUN = "live"


def stop_when(source, store, n_rows, timeout=20.0):
    """Set the run's stop flag once the store holds `n_rows` rows (from another thread)."""
    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and store.manifest().summary()["rows"] < n_rows:
            time.sleep(0.05)
        source.client.set(RunKeys(RUN).stop, "1")
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def stream(redis_url, store, replicas=None, answered=(), **kw):
    source = IntakeSource(redis_url, RUN, answered=set(answered))
    sched = Scheduler(replicas or [FakeReplica("a", batch_size=4)], store, **kw)
    return source, sched


def test_push_validates_dedups_and_refuses_reused_ids(redis_server):
    intake = Intake(redis_server.url, RUN, max_chars=50)
    first = intake.push("What is Ray?", task="docs")
    assert first.accepted
    again = intake.push("What is Ray?", task="docs")  # same content and decoding: answered once
    assert not again.accepted and again.query_id == first.query_id
    assert intake.push("What is Ray?", task="docs", decoding={"max_new_tokens": 9}).accepted  # other decoding
    assert intake.push("Hi", id="mine").query_id == "mine"
    with pytest.raises(InputError, match="'mine' was already used"):
        intake.push("Something else", id="mine")
    with pytest.raises(InputError, match="empty prompt"):
        intake.push("   ")
    with pytest.raises(InputError, match="over the limit of 50"):
        intake.push("x" * 51)
    with pytest.raises(InputError, match="decoding"):
        intake.push("ok", decoding={"temperature": -1})
    b = backlog(redis_server.url, RUN)
    assert (b.waiting, b.in_progress, b.pushed, b.duplicates) == (3, 0, 3, 1)


def test_stream_answers_each_prompt_once_and_acks_after_store(redis_server, tmp_path):
    intake = Intake(redis_server.url, RUN)
    for i in range(10):
        intake.push(f"prompt {i}")
    store = DatasetStore(tmp_path / "ds")
    source, sched = stream(redis_server.url, store, flush_rows=4, flush_seconds=60)
    acked_before_store = []
    real_stored = source.stored

    def checked(table):  # the stream may forget a prompt only once its answer is in the store
        ids = set(store.read(columns=["query_id"]).column("query_id").to_pylist())
        acked_before_store.extend(q for q in table.column("query_id").to_pylist() if q not in ids)
        real_stored(table)
    source.stored = checked
    stop_when(source, store, 8)  # the last 2 answers wait in the buffer (flush_seconds=60): a stop writes them
    summary = asyncio.run(sched.run_stream(source, poll_seconds=0.1))
    rows = store.read()
    assert sorted(rows.column("query_id").to_pylist()) == sorted(set(rows.column("query_id").to_pylist()))
    assert rows.num_rows == 10 and summary["ok_rows"] == 10 and not acked_before_store
    b = backlog(redis_server.url, RUN)
    assert (b.waiting, b.in_progress, b.answered) == (0, 0, 10)
    assert source.client.xlen(RunKeys(RUN)("intake")) == 0  # acknowledged entries are deleted


def test_crash_redelivers_unacknowledged_prompts_without_duplicates(redis_server, tmp_path):
    intake = Intake(redis_server.url, RUN)
    for i in range(6):
        intake.push(f"prompt {i}")
    store = DatasetStore(tmp_path / "ds")
    # A scheduler reads 4 prompts, stores the answers of 2 of them, then dies before acknowledging anything.
    crashed = IntakeSource(redis_server.url, RUN, answered=set())
    got, _ = crashed.fetch(4)
    assert len(got) == 4
    from backpack.core.schema import completions_to_table
    from backpack.core.types import Completion
    store.append(completions_to_table(got[:2], [Completion(q.id, "t", text="ok", token_ids=[1]) for q in got[:2]]))
    assert backlog(redis_server.url, RUN).in_progress == 4
    # The restarted scheduler (same consumer name) gets the 4 back, skips the 2 already stored, answers the rest.
    source, sched = stream(redis_server.url, store, answered=store.answered_ids(), flush_rows=2)
    stop_when(source, store, 6)
    asyncio.run(sched.run_stream(source, poll_seconds=0.1))
    ids = store.read(columns=["query_id"]).column("query_id").to_pylist()
    assert len(ids) == 6 == len(set(ids))
    assert backlog(redis_server.url, RUN).in_progress == 0


def test_backpressure_shards_by_age_and_failures_reported(redis_server, tmp_path):
    intake = Intake(redis_server.url, RUN)
    for i in range(12):
        intake.push("poison" if i == 5 else f"prompt {i}")
    store = DatasetStore(tmp_path / "ds")
    rep = FakeReplica("a", batch_size=2, max_in_flight=1, delay=0.05)
    source, sched = stream(redis_server.url, store, [rep], flush_rows=1000, flush_seconds=0.3, max_pending=3,
                           max_retries=0)
    seen = []
    real_fetch = source.fetch

    def fetch(max_rows, block_ms=0):  # record how many prompts the scheduler asked for at most
        seen.append(max_rows)
        return real_fetch(max_rows, block_ms)
    source.fetch = fetch
    stop_when(source, store, 12)
    asyncio.run(sched.run_stream(source, poll_seconds=0.1))
    assert max(seen) <= 3  # never more than max_pending prompts out of the stream at once
    m = store.manifest()
    assert m.summary()["rows"] == 12 and len(m.shards) > 1  # flush_rows never reached: shards written by age
    rows = store.read()
    failed = rows.filter(pc.equal(rows.column("status"), "failed"))
    assert failed.num_rows == 1 and "poison" in failed.column("messages").to_pylist()[0][0]["content"]
    b = backlog(redis_server.url, RUN)
    assert (b.answered, b.failed, b.in_progress, b.waiting) == (11, 1, 0, 0)
    # the failed prompt's dedup record is gone: pushing it again queues a retry
    assert intake.push("poison").accepted


def test_stop_leaves_unsent_prompts_for_the_next_run(redis_server, tmp_path):
    intake = Intake(redis_server.url, RUN)
    for i in range(8):
        intake.push(f"prompt {i}")
    store = DatasetStore(tmp_path / "ds")
    rep = FakeReplica("a", batch_size=2, max_in_flight=1, delay=0.3)
    source, sched = stream(redis_server.url, store, [rep], flush_rows=1)
    stop_when(source, store, 2)
    asyncio.run(sched.run_stream(source, poll_seconds=0.1))
    done = store.manifest().summary()["rows"]
    assert 2 <= done < 8
    b = backlog(redis_server.url, RUN)
    assert b.in_progress + b.waiting == 8 - done
    source.client.delete(RunKeys(RUN).stop)
    source, sched = stream(redis_server.url, store, answered=store.answered_ids())
    stop_when(source, store, 8)
    asyncio.run(sched.run_stream(source, poll_seconds=0.1))
    ids = store.read(columns=["query_id"]).column("query_id").to_pylist()
    assert len(ids) == 8 == len(set(ids))
    assert source.client.xpending(RunKeys(RUN)("intake"), GROUP)["pending"] == 0


def test_a_redis_restart_from_its_aof_loses_no_acknowledged_state(tmp_path):
    """Redis killed hard (SIGKILL, no shutdown save) and started again on its AOF: the backlog, what was
    acknowledged, the de-duplication records, the counters and the live student version are all still there.
    (Redis writes the AOF before it answers a command; `appendfsync everysec` bounds what a machine crash, not a
    process crash, could lose to the last second.)"""
    from backpack.runtime.redis_server import EmbeddedRedis
    from backpack.student.registry import Registry

    first = EmbeddedRedis(tmp_path / "redis").start()
    try:
        intake = Intake(first.url, RUN)
        ids = [intake.push(f"question {i}").query_id for i in range(3)]
        source = IntakeSource(first.url, RUN, answered=set())
        got, _ = source.fetch(3)
        assert [q.id for q in got] == ids
        answered = [q.id for q in got[:2]]
        source.stored(pa.table({"query_id": answered, "status": ["ok", "ok"]}))
        Registry(first.url, RUN, tmp_path).promote(0, by="test", reason="before the crash")
    finally:
        first.proc.kill()  # no SIGTERM: nothing is saved on the way down
        first.proc.wait()
    with EmbeddedRedis(tmp_path / "redis") as again:
        b = backlog(again.url, RUN)
        assert (b.waiting, b.in_progress, b.pushed, b.answered) == (0, 1, 3, 2)
        assert not Intake(again.url, RUN).push("question 0").accepted  # still a duplicate
        assert Registry(again.url, RUN, tmp_path).live() == 0
        # the one prompt read but never stored is delivered again to the scheduler that had it
        got, _ = IntakeSource(again.url, RUN, answered=set(answered)).fetch(10)
        assert [q.id for q in got] == [ids[2]]


def test_malformed_entries_and_failed_rows_stored_before_a_crash(redis_server, tmp_path):
    """An entry another program wrote that is not a valid Query becomes one failed row (the scheduler does not
    crash on it), and a failed row stored just before a crash is not stored again when its entry is
    re-delivered."""
    import json

    from backpack.core.schema import completions_to_table
    from backpack.core.types import Completion

    intake = Intake(redis_server.url, RUN)
    good = intake.push("a fine prompt").query_id
    key = RunKeys(RUN)("intake")
    intake.client.xadd(key, {"query": json.dumps({"id": "x1", "messages": "not a list"})})
    intake.client.xadd(key, {"query": json.dumps({"id": "x2", "messages": [{"role": "user", "content": 5}]})})
    intake.client.xadd(key, {"other": "field"})
    # a scheduler reads everything, stores a failed row for the good prompt, and dies before acknowledging
    crashed = IntakeSource(redis_server.url, RUN, answered=set())
    queries, rejected = crashed.fetch(10)
    assert [q.id for q in queries] == [good] and len(rejected) == 3
    store = DatasetStore(tmp_path / "ds")
    store.append(completions_to_table(queries, [Completion.failed(good, "t", "teacher fell over")]))
    # the restarted scheduler: the stored failed row is acknowledged, not answered again; the bad entries fail once
    source, sched = stream(redis_server.url, store, answered=store.answered_ids(), flush_rows=1)
    source.stored_ids |= set(store.query_status())
    stop_when(source, store, 4)
    asyncio.run(sched.run_stream(source, poll_seconds=0.1))
    rows = store.read(columns=["query_id", "status", "error"]).to_pylist()
    assert sorted(r["query_id"] for r in rows).count(good) == 1 and len(rows) == 4
    assert all(r["status"] != "ok" for r in rows)
    assert any("not a Backpack query" in (r["error"] or "") for r in rows)
    b = backlog(redis_server.url, RUN)
    assert (b.waiting, b.in_progress) == (0, 0)


def _store_answers(store, queries, status="ok"):
    from backpack.core.schema import completions_to_table
    from backpack.core.types import Completion

    comps = [Completion(q.id, "t", text="ok", token_ids=[1]) if status == "ok" else
             Completion(q.id, "t", status="failed", error="teacher down") for q in queries]
    store.append(completions_to_table(queries, comps))


def test_a_push_under_an_id_a_batch_generate_answered_is_refused_not_dropped(redis_server, tmp_path):
    from backpack.core.types import DecodingParams, Query
    from backpack.scheduling.intake import answered_prompts

    store = DatasetStore(tmp_path / "ds")
    batch = Query(messages=[{"role": "user", "content": "What is Ray?"}], id="q-1")
    _store_answers(store, [batch])  # answered by an earlier batch `generate` of the run
    # pushed before the continual run records the stored prompts: the scheduler fails it with a reason
    early = Intake(redis_server.url, RUN)
    early.push("Something else entirely", id="q-1")
    source = IntakeSource(redis_server.url, RUN, answered=answered_prompts(store.read()))
    got, rejected = source.fetch(10)
    assert got == [] and len(rejected) == 1 and "'q-1' already names another, answered prompt" in rejected[0].reason
    # once recorded: another prompt under that id is refused at the push; the same prompt is a duplicate
    early.claim_answered(answered_prompts(store.read()))
    with pytest.raises(InputError, match="'q-1' was already used for another prompt"):
        early.push("Yet another prompt", id="q-1")
    same = early.push_query(Query(messages=batch.messages, id="q-2", decoding=DecodingParams()))
    assert not same.accepted and same.query_id == "q-1"


def test_a_failed_row_stored_before_a_crash_leaves_the_prompt_retryable(redis_server, tmp_path):
    intake = Intake(redis_server.url, RUN)
    assert intake.push("flaky prompt").accepted
    store = DatasetStore(tmp_path / "ds")
    crashed = IntakeSource(redis_server.url, RUN, answered=set())
    got, _ = crashed.fetch(4)
    _store_answers(store, got, status="failed")  # ... and the scheduler dies before stored()
    status = store.query_status()
    again = IntakeSource(redis_server.url, RUN, answered=store.answered_ids(), stored_ids=set(status))
    assert again.fetch(4) == ([], [])  # its failed row is stored: acknowledged, not answered twice
    assert intake.push("flaky prompt").accepted  # and a re-push retries it, as after a failure without a crash


def test_a_prompts_own_decoding_is_capped_by_the_runs_limits(redis_server):
    from backpack.config import DecodingConfig, PromptsConfig

    intake = Intake(redis_server.url, RUN)  # caps default to the intake's own decoding (64 tokens, n 1)
    with pytest.raises(InputError, match=r"decoding.max_new_tokens=32768 is over this run's limit of 64 .*"
                                         r"prompts.override_max_new_tokens"):
        intake.push("long please", decoding={"max_new_tokens": 32768})
    with pytest.raises(InputError, match=r"decoding.n=64 is over this run's limit of 1"):
        intake.push("many please", decoding={"n": 64, "temperature": 1.0})
    assert intake.push("shorter is fine", decoding={"max_new_tokens": 8}).accepted
    caps = PromptsConfig(path="p.jsonl", override_max_new_tokens=512, override_max_n=4).override_caps(
        DecodingConfig())
    assert caps == {"max_new_tokens": 512, "n": 4, "logprobs": 0}
    wider = Intake(redis_server.url, RUN, caps=caps)
    assert wider.push("long please", decoding={"max_new_tokens": 512}).accepted
    with pytest.raises(InputError, match="decoding.logprobs=5 is over this run's limit of 0"):
        wider.push("logprobs please", decoding={"logprobs": 5})
