"""Policy ensemble: the pure keep rules and hold (scheduling/ensemble.py), the scheduler asking k teachers with
in-process fake replicas (no Ray, no model), and its config checks."""

import asyncio
from collections import Counter, defaultdict

import pyarrow as pa
import pytest

from backpack.config import EnsembleConfig, validate_config
from backpack.core.schema import completions_to_table, failed_table, queries_to_table, table_to_queries
from backpack.core.types import Completion, DecodingParams, Query
from backpack.errors import ConfigError
from backpack.scheduling.ensemble import EnsembleHold, agreement, first, logprob, longest, pick_teachers
from backpack.scheduling.scheduler import Scheduler, run_sync

from test_scheduler import Died, ListSink  # (tests/ is on sys.path under pytest)

# ---------------------------------------------------------------- the rules, on plain rows


def rows(*texts, lps=None):
    return [{"text": t, "token_logprobs": lps} for t in texts]


def test_first_and_longest_follow_the_order_asked_on_ties():
    answers = {"b": rows("a longer answer"), "a": rows("short"), "c": rows("same size answer")}
    assert first(answers, ["a", "b", "c"]) == "a" and first(answers, ["c", "b", "a"]) == "c"
    assert longest(answers, ["a", "b", "c"]) == "c"  # 16 characters against 15
    assert longest({"x": rows("abc"), "y": rows("xyz")}, ["y", "x"]) == "y"
    assert longest({"x": rows("a" * 10, ""), "y": rows("b" * 6)}, ["x", "y"]) == "y"  # mean over the samples


def test_agreement_keeps_the_answer_most_like_the_others():
    answers = {"odd": rows("Quantum chromodynamics on a lattice."),
               "a": rows("The capital of France is Paris."),
               "b": rows("Paris is the capital of France."),
               "c": rows("The capital of France is Paris, a large city.")}
    assert agreement(answers, ["odd", "a", "b", "c"]) in {"a", "c"}
    assert agreement(answers, ["odd", "a", "b", "c"]) != "odd"
    # of two answers each is as like the other: the first asked
    assert agreement({"x": rows("one"), "y": rows("two")}, ["y", "x"]) == "y"


def test_logprob_prefers_the_surest_teacher_and_falls_back_without_logprobs():
    sure, unsure = rows("a", lps=[-0.1, -0.2]), rows("b", lps=[-2.0, -0.1])
    assert logprob({"u": unsure, "s": sure}, ["u", "s"]) == "s"
    # one answer without logprobs: agreement (two teachers: the first asked)
    assert logprob({"u": unsure, "s": rows("a")}, ["u", "s"]) == "u"
    assert logprob({"u": rows("b", lps=[]), "s": sure}, ["s", "u"]) == "s"


def test_pick_teachers_takes_the_first_live_ones_in_config_order():
    order = ["a", "b", "c"]
    assert pick_teachers(order, {"a", "b", "c"}, 2) == ["a", "b"]
    assert pick_teachers(order, {"b", "c"}, 2) == ["b", "c"]       # a is dead: c stands in
    assert pick_teachers(order, {"c"}, 2) == ["a", "c"]            # too few live: a dead one fills in
    assert pick_teachers(order, {"a"}, ["c", "a"]) == ["c", "a"]   # named: as given


# ---------------------------------------------------------------- the hold


def qs(n, teacher=None, n_samples=1):
    dec = DecodingParams(temperature=0.7, n=n_samples) if n_samples > 1 else DecodingParams()
    return [Query(messages=[{"role": "user", "content": f"q{i}"}], teacher=teacher, decoding=dec) for i in range(n)]


def answered(queries, teacher, text="ok", n=1, lps=None):
    return completions_to_table(queries, [Completion(q.id, teacher, text=f"{text} {j}" if n > 1 else text,
                                                     token_ids=[1] * len(text), sample_index=j, replica=f"{teacher}/0",
                                                     token_logprobs=lps or [])
                                          for q in queries for j in range(n)])


def failed(queries, teacher):
    return failed_table(queries_to_table(queries), teacher, f"{teacher} broke")


def test_hold_joins_split_and_differently_cut_copies_by_query_id():
    q = qs(4)
    hold = EnsembleHold("all")
    hold.expect([x.id for x in q], ["a", "b"])
    assert hold.add("a", answered(q[:3], "a")) is None                 # b has not answered yet
    out = hold.add("b", answered(q[:2], "b"))                          # b's first half: q0, q1 complete
    assert sorted(Counter(out.column("query_id").to_pylist()).values()) == [2, 2]
    assert hold.partial == 1 and len(hold) == 2
    assert hold.add("b", answered(q[2:], "b")).num_rows == 2           # q2 complete; q3 waits for a
    out = hold.add("a", answered(q[3:], "a"))
    assert out.num_rows == 2 and len(hold) == 0 and hold.partial == 0


def test_hold_keep_rule_failures_and_samples():
    q = qs(3, n_samples=2)
    hold = EnsembleHold("longest")
    hold.expect([x.id for x in q], ["a", "b"])
    hold.add("a", pa.concat_tables([answered(q[:1], "a", "tiny", n=2), failed(q[1:], "a")]))
    out = hold.add("b", pa.concat_tables([answered(q[:2], "b", "a long answer", n=2), failed(q[2:], "b")]))
    by_q = defaultdict(list)
    for r in out.to_pylist():
        by_q[r["query_id"]].append(r)
    assert [r["teacher"] for r in by_q[q[0].id]] == ["b", "b"]         # the longer teacher's two samples
    assert [(r["teacher"], r["status"]) for r in by_q[q[1].id]] == [("b", "ok")] * 2  # a's failure not written
    assert sorted((r["teacher"], r["status"]) for r in by_q[q[2].id]) == [("a", "failed"), ("b", "failed")]
    assert hold.unkept_rows == 2 and hold.unkept_tokens == 8 and hold.teacher_failures == 1


def test_hold_passes_unexpected_rows_and_finishes_a_stopping_stream():
    q = qs(3)
    hold = EnsembleHold("first")
    assert hold.add("a", answered(q[:1], "a")).num_rows == 1           # never expected: written as it is
    hold.expect([x.id for x in q[1:]], ["a", "b"])
    hold.add("b", answered(q[1:2], "b"))
    hold.add("b", failed(q[2:], "b"))
    out = hold.finish(complete=False)                                  # a's copies were never sent
    assert out.column("query_id").to_pylist() == [q[1].id] and out.column("teacher").to_pylist() == ["b"]
    assert len(hold) == 0                                               # q2 is left to the stream


def test_hold_rejects_an_unknown_rule():
    with pytest.raises(ValueError, match="unknown ensemble keep"):
        EnsembleHold("loudest")


# ---------------------------------------------------------------- the scheduler, with fake replicas


class FakeReplica:
    def __init__(self, name, teacher, batch_size=2, max_in_flight=2, text="ok", fail=False, die_after=None,
                 delay=0.01, poison=False, lps=None, log=None):
        self.name, self.teacher, self.batch_size, self.max_in_flight = name, teacher, batch_size, max_in_flight
        self.text, self.fail, self.die_after, self.delay, self.poison, self.lps = text, fail, die_after, delay, \
            poison, lps
        self.calls, self.log = 0, log

    async def _answer(self, table):
        self.calls += 1
        if self.log is not None:
            self.log.append(self.teacher)
        await asyncio.sleep(self.delay)
        if self.die_after is not None and self.calls > self.die_after:
            raise Died(f"{self.name} died")
        if self.fail:
            raise RuntimeError(f"{self.teacher} is broken")
        q = table_to_queries(table)
        if self.poison and any("poison" in x.messages[-1]["content"] for x in q):
            raise RuntimeError("cannot digest poison")
        return completions_to_table(q, [Completion(x.id, self.teacher, text=self.text, token_ids=[1, 2],
                                                   replica=self.name, token_logprobs=self.lps or [],
                                                   sample_index=j)
                                        for x in q for j in range(x.decoding.n)])

    def submit(self, table):
        return self._answer(table)

    def is_fatal(self, err):
        return isinstance(err, Died)


def ensemble(reps, sink, teachers=2, keep="all", **kw):
    return Scheduler(reps, sink, policy="ensemble", ensemble=EnsembleConfig(teachers=teachers, keep=keep), **kw)


def by_query(rows) -> dict:
    out = defaultdict(list)
    for r in rows:
        out[r["query_id"]].append(r)
    return out


def test_keep_all_writes_every_teachers_answer():
    reps = [FakeReplica("a/0", "a"), FakeReplica("a/1", "a"), FakeReplica("b/0", "b", batch_size=3),
            FakeReplica("c/0", "c")]
    sink = ListSink()
    s = run_sync(ensemble(reps, sink, flush_rows=4), queries_to_table(qs(10)))
    got = by_query(sink.rows)
    assert len(got) == 10 and all(sorted(r["teacher"] for r in rs) == ["a", "b"] for rs in got.values())
    assert all(r["replica"].split("/")[0] == r["teacher"] for rs in got.values() for r in rs)
    assert reps[3].calls == 0                                          # k = 2: the first two teachers
    assert s["ok_rows"] == 20 and s["failed_rows"] == 0 and s["queries"] == 10
    assert reps[0].calls and reps[1].calls                             # a's copies spread over its replicas


def test_keep_longest_writes_the_longest_teachers_samples():
    reps = [FakeReplica("a/0", "a", text="short"), FakeReplica("b/0", "b", text="the longest answer"),
            FakeReplica("c/0", "c", text="middling")]
    sink = ListSink()
    s = run_sync(ensemble(reps, sink, teachers=["c", "b"], keep="longest"), queries_to_table(qs(5, n_samples=2)))
    got = by_query(sink.rows)
    assert len(got) == 5 and all([r["teacher"] for r in rs] == ["b", "b"] for rs in got.values())
    assert reps[0].calls == 0 and s["ok_rows"] == 10
    assert s["ensemble_unkept_rows"] == 10 and s["ensemble_unkept_tokens"] == 20


def test_keep_logprob_and_first():
    reps = [FakeReplica("a/0", "a", lps=[-3.0, -1.0]), FakeReplica("b/0", "b", lps=[-0.5, -0.5])]
    sink = ListSink()
    run_sync(ensemble(reps, sink, keep="logprob"), queries_to_table(qs(3)))
    assert {r["teacher"] for r in sink.rows} == {"b"} and len(sink.rows) == 3
    sink = ListSink()
    run_sync(ensemble(reps, sink, teachers=["b", "a"], keep="first"), queries_to_table(qs(3)))
    assert {r["teacher"] for r in sink.rows} == {"b"} and len(sink.rows) == 3


@pytest.mark.parametrize("keep", ["all", "first"])
def test_one_teacher_failing_everything_leaves_the_queries_answered(keep):
    reps = [FakeReplica("a/0", "a", fail=True), FakeReplica("b/0", "b")]
    sink = ListSink()
    s = run_sync(ensemble(reps, sink, keep=keep, max_retries=1), queries_to_table(qs(5)))
    assert [(r["teacher"], r["status"]) for r in sink.rows] == [("b", "ok")] * 5
    assert s["ok_rows"] == 5 and s["failed_rows"] == 0 and s["ensemble_teacher_failures"] == 5
    assert reps[0].calls >= 2                                          # a's copies were retried (within a)


def test_every_teacher_failing_writes_each_teachers_failure():
    reps = [FakeReplica("a/0", "a", fail=True), FakeReplica("b/0", "b", fail=True)]
    sink = ListSink()
    s = run_sync(ensemble(reps, sink, keep="longest", max_retries=1), queries_to_table(qs(3)))
    got = by_query(sink.rows)
    assert len(got) == 3 and s["failed_rows"] == 6 and s["ok_rows"] == 0
    for rs in got.values():
        assert sorted(r["teacher"] for r in rs) == ["a", "b"] and all(r["status"] == "failed" for r in rs)
        assert all(f"{r['teacher']} is broken" in r["error"] for r in rs)


def test_a_dead_replica_mid_run():
    # a/0 dies, a/1 takes a's copies on; b's only replica dies, so b's later copies fail and a answers alone
    reps = [FakeReplica("a/0", "a", die_after=1), FakeReplica("a/1", "a"), FakeReplica("b/0", "b", die_after=2)]
    sink = ListSink()
    s = run_sync(ensemble(reps, sink, max_retries=1), queries_to_table(qs(12)))
    got = by_query(sink.rows)
    assert len(got) == 12 and {"a/0", "b/0"} <= set(s["dead_replicas"])
    assert all([r["status"] for r in rs] == ["ok"] * len(rs) for rs in got.values())
    assert all("a" in {r["teacher"] for r in rs} for rs in got.values())
    assert 0 < sum("b" in {r["teacher"] for r in rs} for rs in got.values()) < 12
    assert s["ensemble_teacher_failures"] == 12 - sum("b" in {r["teacher"] for r in rs} for rs in got.values())


def test_split_copies_join_back_and_a_named_teacher_is_asked_alone():
    # a chokes on the poison prompt (its copy is split down to it); b answers it; batch sizes differ
    reps = [FakeReplica("a/0", "a", batch_size=4, poison=True), FakeReplica("b/0", "b", batch_size=3)]
    poison = Query(messages=[{"role": "user", "content": "poison"}])
    named = Query(messages=[{"role": "user", "content": "for b"}], teacher="b")
    sink = ListSink()
    s = run_sync(ensemble(reps, sink, max_retries=1), queries_to_table(qs(7) + [poison, named]))
    got = by_query(sink.rows)
    assert len(got) == 9 and s["failed_rows"] == 0
    assert [r["teacher"] for r in got[poison.id]] == ["b"] and [r["teacher"] for r in got[named.id]] == ["b"]
    assert all(sorted(r["teacher"] for r in got[q.id]) == ["a", "b"] for q in qs(7))
    assert s["ensemble_teacher_failures"] == 1


def test_a_fast_teacher_waits_for_a_slow_one_within_max_pending():
    log = []
    reps = [FakeReplica("a/0", "a", batch_size=1, max_in_flight=1, delay=0.0, log=log),
            FakeReplica("b/0", "b", batch_size=1, max_in_flight=1, delay=0.02, log=log)]
    sink = ListSink()
    s = run_sync(ensemble(reps, sink, max_pending=2), queries_to_table(qs(10)))
    assert s["ok_rows"] == 20 and len(by_query(sink.rows)) == 10
    lead = max(log[:i].count("a") - log[:i].count("b") for i in range(len(log) + 1))
    assert lead <= 4  # without the limit a answers all ten before b its second


# ---------------------------------------------------------------- config


def run_config(tmp_path, teachers=("a", "b"), **scheduler) -> dict:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    return {"name": "t", "teachers": [{"name": n} for n in teachers], "prompts": {"path": str(prompts)},
            "scheduler": scheduler}


def problems(data) -> str:
    with pytest.raises(ConfigError) as e:
        validate_config(data)
    return "\n".join(e.value.problems)


def test_config_checks_the_ensemble_against_the_teachers(tmp_path):
    cfg = validate_config(run_config(tmp_path, policy="ensemble"))
    assert cfg.scheduler.ensemble is None and cfg.scheduler.answers_per_query() == 2
    cfg = validate_config(run_config(tmp_path, ("a", "b", "c"), policy="ensemble",
                                     ensemble={"teachers": 3, "keep": "agreement"}))
    assert cfg.scheduler.ensemble.size() == 3 and cfg.scheduler.answers_per_query() == 1
    text = problems(run_config(tmp_path, policy="ensemble", ensemble={"teachers": 3}))
    assert "scheduler.ensemble.teachers is 3 but the run has 2 teacher(s) (a, b)" in text
    assert "the run has 1 teacher(s) (a)" in problems(run_config(tmp_path, ("a",), policy="ensemble"))
    assert "2 teachers or more (got 1)" in problems(run_config(tmp_path, policy="ensemble", ensemble={"teachers": 1}))
    assert "unknown teacher(s) z" in problems(run_config(tmp_path, policy="ensemble",
                                                         ensemble={"teachers": ["a", "z"]}))
    assert "2 different teachers" in problems(run_config(tmp_path, policy="ensemble",
                                                         ensemble={"teachers": ["a", "a"]}))
    assert "needs 3 teachers or more" in problems(run_config(tmp_path, policy="ensemble",
                                                             ensemble={"keep": "agreement"}))
    assert "decoding.logprobs >= 1" in problems(run_config(tmp_path, policy="ensemble", ensemble={"keep": "logprob"}))
    assert "scheduler.policy is 'round_robin'" in problems(run_config(tmp_path, ensemble={"teachers": 2}))
    assert "scheduler.ensemble.keep" in problems(run_config(tmp_path, policy="ensemble", ensemble={"keep": "loud"}))
