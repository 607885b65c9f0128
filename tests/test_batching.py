"""Dynamic batching (backpack/teachers/batching.py) with a fake model, then length bucketing and batching on the
tiny hf teacher, in-process and through a Ray actor."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from backpack.config import TeacherConfig
from backpack.core.schema import queries_to_table
from backpack.core.types import Completion, DecodingParams, Query
from backpack.teachers.batching import BatcherClosed, DynamicBatcher


def queries(*names, n=1):
    return [Query(messages=[{"role": "user", "content": p}], id=p,
                  decoding=DecodingParams(n=n, temperature=1.0 if n > 1 else 0.0)) for p in names]


def column(answers, name):
    """One field of every answer, as a table's column would give it."""
    return [getattr(a, name) for a in answers]


class FakeModel:
    """Answers each Query with its n samples, in reverse Query order (the batcher must put them back); records
    the rows of every call and can hold a call until released."""

    def __init__(self, fail_on=None):
        self.calls: list[list[str]] = []
        self.fail_on = fail_on
        self.release = threading.Event()
        self.release.set()

    def __call__(self, qs: list[Query]) -> list[Completion]:
        ids = [q.id for q in qs]
        self.calls.append(ids)
        self.release.wait()
        if self.fail_on in ids:
            raise ValueError(f"cannot answer {self.fail_on}")
        return [Completion(query_id=q.id, teacher="fake", sample_index=i, text=f"{q.id}#{i}")
                for q in reversed(qs) for i in range(q.decoding.n)]


def wait_for(cond, what):
    for _ in range(2000):
        if cond():
            return
        time.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


def submit_all(submit, calls):
    """`submit` each call's Queries from its own thread, all at once."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(submit, calls))


def test_many_one_row_callers_share_few_model_calls():
    model = FakeModel()
    b = DynamicBatcher(model, max_rows=4, max_wait_s=3600)   # only full batches run: the count is exact
    try:
        outs = submit_all(b.submit, [queries(f"q{i}") for i in range(16)])
    finally:
        b.close()
    assert sorted(len(c) for c in model.calls) == [4, 4, 4, 4]
    assert [column(o, "query_id") for o in outs] == [[f"q{i}"] for i in range(16)]
    assert b.stats == {"calls": 16, "batches": 4, "rows": 16}


def test_each_caller_gets_exactly_its_rows_in_its_order():
    model = FakeModel()
    calls = [queries("a", "b"), queries("c", n=3), queries("d", "e", "f", n=2), queries("g")]
    b = DynamicBatcher(model, max_rows=64, max_wait_s=3600, max_callers=len(calls))
    try:
        outs = submit_all(b.submit, calls)
    finally:
        b.close()
    assert len(model.calls) == 1 and sorted(model.calls[0]) == list("abcdefg")   # all callers in one call
    assert [column(o, "text") for o in outs] == [
        ["a#0", "b#0"], ["c#0", "c#1", "c#2"], ["d#0", "d#1", "e#0", "e#1", "f#0", "f#1"], ["g#0"]]


def test_a_lone_caller_is_not_stuck():
    model = FakeModel()
    b = DynamicBatcher(model, max_rows=100, max_wait_s=0.05)   # rule 2: the oldest waited max_wait_s
    assert column(b.submit(queries("x")), "text") == ["x#0"]
    b.close()
    # rule 3: with one possible caller, no wait at all however long max_wait_s is
    b = DynamicBatcher(model, max_rows=100, max_wait_s=3600, max_callers=1)
    assert column(b.submit(queries("y")), "text") == ["y#0"]
    b.close()


def test_callers_that_queue_while_the_model_is_busy_run_together():
    model = FakeModel()
    model.release.clear()
    b = DynamicBatcher(model, max_rows=100, max_wait_s=0)   # no waiting: only what queued behind a busy model
    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(b.submit, queries("first"))
        wait_for(lambda: len(model.calls) == 1, "the first call started")
        rest = [pool.submit(b.submit, queries(f"r{i}")) for i in range(5)]
        wait_for(lambda: b.stats["calls"] == 6, "five callers waiting")
        model.release.set()
        assert len(first.result()) == 1 and [len(f.result()) for f in rest] == [1] * 5
    b.close()
    assert [len(c) for c in model.calls] == [1, 5]


def test_a_failure_reaches_every_caller_of_its_batch_only():
    model = FakeModel(fail_on="bad")
    b = DynamicBatcher(model, max_rows=3, max_wait_s=3600)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(b.submit, queries(name)) for name in ("ok1", "bad", "ok2")]
        for f in futures:
            with pytest.raises(ValueError, match="cannot answer bad"):
                f.result()
    assert len(b.submit(queries("a", "b", "c"))) == 3   # the worker lives on
    b.close()


def test_callers_that_cannot_share_a_batch_run_apart():
    model = FakeModel()
    model.release.clear()
    b = DynamicBatcher(model, max_rows=4, max_wait_s=0)
    with ThreadPoolExecutor(6) as pool:
        head = pool.submit(b.submit, queries("head"))
        wait_for(lambda: len(model.calls) == 1, "the first call started")
        later = []
        for qs in (queries("k", "l"), queries("m"), queries("k"), queries("z")):   # one at a time: their order is the test
            later.append(pool.submit(b.submit, qs))
            wait_for(lambda: b.stats["calls"] == len(later) + 1, f"caller {len(later)} waiting")
        model.release.set()
        outs = [f.result() for f in [head] + later]
    b.close()
    # "k" twice cannot share a batch (its answers would be ambiguous); the caller after it joins the second "k"
    assert model.calls == [["head"], ["k", "l", "m"], ["k", "z"]]
    assert [column(o, "text") for o in outs] == [["head#0"], ["k#0", "l#0"], ["m#0"], ["k#0"], ["z#0"]]


def test_rows_over_max_rows_run_alone_and_whole():
    model = FakeModel()
    b = DynamicBatcher(model, max_rows=2, max_wait_s=3600)
    assert len(b.submit(queries("a", "b", "c"))) == 3
    b.close()
    assert model.calls == [["a", "b", "c"]]


def test_close_runs_what_waits_then_refuses():
    model = FakeModel()
    b = DynamicBatcher(model, max_rows=100, max_wait_s=3600)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(b.submit, queries("w"))
        wait_for(lambda: b.stats["calls"] == 1, "the caller waiting")
        b.close(timeout=30)
        assert column(waiting.result(), "text") == ["w#0"]   # rule 4: closing runs it at once
    assert not b._thread.is_alive()
    with pytest.raises(BatcherClosed):
        b.submit(queries("late"))


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="max_rows=0"):
        DynamicBatcher(FakeModel(), max_rows=0, max_wait_s=0.01)


def test_config_switch_and_actor_options():
    from backpack.run.actors import teacher_options

    on = TeacherConfig(name="t", max_in_flight=6)
    assert on.dynamic_batching() and teacher_options(on)["max_concurrency"] == 8
    off = TeacherConfig(name="t", max_batch_wait_ms=0)
    assert not off.dynamic_batching() and "max_concurrency" not in teacher_options(off)


# ---------------------------------------------------------------------------------------------- hf teacher

PROMPTS = ["word " * 30, "hi", "word " * 12, "a b c", "word " * 50, "x", "word " * 20]


def greedy_queries():
    return [Query(messages=[{"role": "user", "content": p}], decoding=DecodingParams(max_new_tokens=6))
            for p in PROMPTS]


def test_length_bucketing_keeps_greedy_answers_and_query_order(tiny_model_dir, monkeypatch):
    from backpack.teachers.hf import HFTeacher

    t = HFTeacher(TeacherConfig(name="tiny", model=tiny_model_dir, batch_size=3))
    qs = greedy_queries()
    singles = [t._generate([q], [t._encode(q)], q.decoding)[0].text for q in qs]   # unpadded, one at a time
    widths, real = [], t._generate
    monkeypatch.setattr(t, "_generate", lambda g, ids, p: widths.append([len(x) for x in ids]) or real(g, ids, p))
    rows = t.generate(queries_to_table(qs)).to_pylist()
    assert [r["query_id"] for r in rows] == [q.id for q in qs]
    assert [r["text"] for r in rows] == singles
    flat = [w for chunk in widths for w in chunk]
    assert [len(c) for c in widths] == [3, 3, 1] and flat == sorted(flat)   # chunks cut from sorted lengths


def test_concurrent_generate_calls_share_one_model_batch(tiny_model_dir):
    from backpack.teachers.host import TeacherHost

    cfg = TeacherConfig(name="tiny", model=tiny_model_dir, batch_size=8, max_in_flight=len(PROMPTS),
                        max_batch_wait_ms=10_000)   # the batch runs once every caller is in (rule 3)
    host = TeacherHost(cfg)
    try:
        qs = greedy_queries()
        alone = host.teacher.teacher.generate(queries_to_table(qs)).column("text").to_pylist()
        outs = submit_all(host.generate, [queries_to_table([q]) for q in qs])
        assert host.batching.batcher.stats["batches"] == 1 and host.ready()["batched_calls"] == len(qs)
        assert [o.column("query_id").to_pylist() for o in outs] == [[q.id] for q in qs]
        assert [o.column("text")[0].as_py() for o in outs] == alone
        assert all(o.schema.equals(outs[0].schema) for o in outs)
    finally:
        host.close()


@pytest.mark.integration
def test_threaded_teacher_actor_gathers_calls_and_answers_ready_meanwhile(ray_session, tiny_model_dir):
    import ray

    from backpack.run.actors import spawn_teacher

    cfg = TeacherConfig(name="tiny", model=tiny_model_dir, batch_size=8, max_in_flight=4, num_cpus=1,
                        max_batch_wait_ms=10_000)
    actor = spawn_teacher(cfg, "tiny/0")
    try:
        ray.get(actor.ready.remote(), timeout=300)
        qs = greedy_queries()[:4]
        refs = [actor.generate.remote(queries_to_table([q])) for q in qs[:3]]
        # three calls wait in the batcher for a fourth (or for 10 s): the actor still answers
        assert ray.get(actor.ready.remote(), timeout=60)["teacher"] == "tiny"
        assert ray.get(actor.peak_memory.remote(), timeout=60) > 0
        refs.append(actor.generate.remote(queries_to_table(qs[3:])))
        outs = ray.get(refs, timeout=120)
        assert [o.column("query_id").to_pylist() for o in outs] == [[q.id] for q in qs]
        info = ray.get(actor.ready.remote())
        assert info["batched_calls"] == 4 and info["model_batches"] <= 2   # 1 unless the 10 s ran out
    finally:
        ray.kill(actor)

