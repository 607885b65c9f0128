"""The scheduler's routing, retry and no-loss logic, with in-process fake replicas (no Ray, no model)."""

import asyncio

import pyarrow as pa
import pytest

from backpack.core.schema import completions_to_table, queries_to_table, table_to_queries
from backpack.core.types import Completion, Query
from backpack.scheduling.scheduler import Scheduler, run_sync


class Died(Exception):
    pass


class FakeReplica:
    def __init__(self, name, teacher="t", batch_size=2, max_in_flight=2, fail_times=0, die_after=None, delay=0.01):
        self.name, self.teacher, self.batch_size, self.max_in_flight = name, teacher, batch_size, max_in_flight
        self.fail_times, self.die_after, self.delay = fail_times, die_after, delay
        self.calls = 0
        self.peak = 0
        self.active = 0

    async def _answer(self, table):
        self.calls += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(self.delay)
            if self.die_after is not None and self.calls > self.die_after:
                raise Died(f"{self.name} died")
            if self.fail_times > 0:
                self.fail_times -= 1
                raise RuntimeError("transient")
            qs = table_to_queries(table)
            if any("poison" in q.messages[-1]["content"] for q in qs):
                raise RuntimeError("cannot digest poison")
            return completions_to_table(qs, [Completion(q.id, self.teacher, text="ok", token_ids=[1],
                                                        replica=self.name) for q in qs])
        finally:
            self.active -= 1

    def submit(self, table):
        return self._answer(table)

    def is_fatal(self, err):
        return isinstance(err, Died)


class ListSink:
    def __init__(self):
        self.tables = []

    def append(self, table):
        self.tables.append(table)

    @property
    def table(self) -> pa.Table:
        return pa.concat_tables(self.tables)

    @property
    def rows(self) -> list[dict]:
        return self.table.to_pylist() if self.tables else []


def queries(n, teacher=None):
    return queries_to_table([Query(messages=[{"role": "user", "content": f"q{i}"}], teacher=teacher)
                             for i in range(n)])


def test_spreads_over_replicas_and_respects_in_flight_limit():
    reps = [FakeReplica("a", max_in_flight=1), FakeReplica("b", max_in_flight=2)]
    sink = ListSink()
    s = run_sync(Scheduler(reps, sink, flush_rows=4), queries(20))
    assert s["ok_rows"] == 20 and s["failed_rows"] == 0
    assert reps[0].calls > 0 and reps[1].calls > 0
    assert reps[0].peak <= 1 and reps[1].peak <= 2
    assert sorted(sink.table.column("query_id").to_pylist()) == sorted(queries(20).column("query_id").to_pylist())
    assert len(sink.tables) >= 4  # flushed in shards as answers arrived


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded"])
def test_dead_replica_work_is_rerouted(policy):
    reps = [FakeReplica("a", die_after=1), FakeReplica("b")]
    sink = ListSink()
    s = run_sync(Scheduler(reps, sink, policy=policy), queries(12))
    assert s["ok_rows"] == 12 and "a" in s["dead_replicas"]
    assert sorted(sink.table.column("query_id").to_pylist()) == sorted(queries(12).column("query_id").to_pylist())
    assert set(sink.table.column("replica").to_pylist()) <= {"a", "b"}


def test_transient_failure_retried_on_the_only_replica():
    rep = FakeReplica("a", fail_times=1)
    s = run_sync(Scheduler([rep], ListSink(), max_retries=2), queries(2))
    assert s["ok_rows"] == 2 and s["retries"] == 1


def test_query_failing_everywhere_is_reported_not_dropped():
    reps = [FakeReplica("a", fail_times=99), FakeReplica("b", fail_times=99)]
    sink = ListSink()
    s = run_sync(Scheduler(reps, sink, max_retries=3), queries(3))
    t = sink.table
    assert s["failed_rows"] == 3 and t.num_rows == 3
    assert all("transient" in e and "no replica could answer" in e for e in t.column("error").to_pylist())


def test_all_replicas_dead_fails_the_rest():
    reps = [FakeReplica("a", die_after=0)]
    sink = ListSink()
    s = run_sync(Scheduler(reps, sink, max_retries=5), queries(5))
    assert s["failed_rows"] == 5 and sink.table.num_rows == 5


def test_routes_by_requested_teacher():
    reps = [FakeReplica("x0", teacher="x"), FakeReplica("y0", teacher="y")]
    sink = ListSink()
    table = pa.concat_tables([queries(3, teacher="y"), queries_to_table(
        [Query(messages=[{"role": "user", "content": "free"}])]), queries_to_table(
        [Query(messages=[{"role": "user", "content": "z"}], teacher="z")])])
    s = run_sync(Scheduler(reps, sink), table)
    rows = {r["query_id"]: r for r in sink.table.to_pylist()}
    assert all(r["replica"] == "y0" for r in rows.values() if r["requested_teacher"] == "y")
    z = [r for r in rows.values() if r["requested_teacher"] == "z"][0]
    assert z["status"] == "failed" and "no live replica of teacher 'z'" in z["error"]
    assert s["ok_rows"] == 4


def test_one_poison_query_fails_alone():
    reps = [FakeReplica("a", batch_size=4), FakeReplica("b", batch_size=4)]
    table = pa.concat_tables([queries(6), queries_to_table([Query(messages=[{"role": "user", "content": "poison"}])]),
                              queries_to_table([Query(messages=[{"role": "user", "content": "after"}])])])
    sink = ListSink()
    s = run_sync(Scheduler(reps, sink, max_retries=1), table)
    rows = sink.table.to_pylist()
    assert s["ok_rows"] == 7 and s["failed_rows"] == 1 and len(rows) == 8
    bad = [r for r in rows if r["status"] == "failed"][0]
    assert bad["messages"][-1]["content"] == "poison" and "cannot digest poison" in bad["error"]


def test_routing_policies_by_task_cheapest_and_fallback():
    """The pure policies on replica snapshots: tags pick specialists (generalists when no live teacher is tagged
    for the task), cost orders cheapest, config order is the fallback chain."""
    from backpack.scheduling.routing import ReplicaView, by_task, cheapest, fallback

    views = [ReplicaView("math/0", "math", tags=("math",), cost=2.0, rank=0),
             ReplicaView("poet/0", "poet", tags=("poetry",), cost=0.5, rank=1),
             ReplicaView("any/0", "any", cost=1.0, rank=2)]
    assert by_task(views, task="math") == 0 and by_task(views, task="poetry") == 1
    assert by_task(views, task="cooking") == 2                 # nobody is tagged for it: the generalist
    views[0].in_flight = views[0].max_in_flight
    assert by_task(views, task="math") is None                  # the specialist is busy: wait for it
    views[0].alive = False
    assert by_task(views, task="math") == 2                     # the specialist is dead: the generalist
    views[0].alive, views[0].in_flight = True, 0
    assert cheapest(views) == 1
    views[1].in_flight = views[1].max_in_flight
    assert cheapest(views) == 2                                 # the cheapest is full: the next cheapest
    views[1].in_flight = 0
    assert fallback(views) == 0
    assert fallback(views, exclude=frozenset({"math/0"})) == 1  # the head failed this batch: the next one
    views[0].in_flight = views[0].max_in_flight
    assert fallback(views) is None                              # a busy head is waited for, not skipped


def test_by_task_batches_reach_the_tagged_teacher_and_fallback_survives_a_failing_head():
    math, poet, general = (FakeReplica("math/0", teacher="math"), FakeReplica("poet/0", teacher="poet"),
                           FakeReplica("any/0", teacher="any"))
    math.tags, poet.tags = ("math",), ("poetry",)
    qs = [Query(messages=[{"role": "user", "content": f"{task} {i}"}], task=task)
          for task in ("math", "poetry", "other") for i in range(3)]
    sink = ListSink()
    summary = run_sync(Scheduler([math, poet, general], sink, policy="by_task"), queries_to_table(qs))
    rows = sink.table.to_pylist()
    assert summary["ok_rows"] == 9
    assert {r["task"]: r["teacher"] for r in rows} == {"math": "math", "poetry": "poet", "other": "any"}

    head, spare = FakeReplica("head/0", teacher="head", fail_times=100), FakeReplica("spare/0", teacher="spare")
    head.rank, spare.rank = 0, 1
    sink = ListSink()
    summary = run_sync(Scheduler([head, spare], sink, policy="fallback", max_retries=2), queries_to_table(qs[:4]))
    assert summary["ok_rows"] == 4 and {r["teacher"] for r in sink.table.to_pylist()} == {"spare"}
    assert head.calls >= 1 and spare.calls >= 1
