"""The query ledger on a real Redis: keys (decoding and context are part of them, unseeded sampling is not
reused), answers reused at no teacher cost, a prompt in flight at one replica not sent by another, a dead
owner's claim taken over, failures not stored; and a second identical `generate` through an openai teacher
that costs zero teacher tokens."""

import threading
import time

import pytest

from backpack.config import validate_config
from backpack.core.schema import queries_to_table
from backpack.core.types import Completion, DecodingParams, Query
from backpack.teachers.accounting import format_usage, teacher_usage
from backpack.teachers.ledger import LedgerTeacher, QueryLedger, ledger_key

from conftest import EXAMPLES


def q(text: str, **decoding) -> Query:
    return Query(messages=[{"role": "user", "content": text}], decoding=DecodingParams(**decoding))


class CountingTeacher:
    """A teacher that answers "A:<prompt>" and counts what it was asked (isolates the ledger's logic)."""

    name = replica = "counting"

    def __init__(self, delay: float = 0.0, fail: set = frozenset()):
        self.asked: list[str] = []
        self.delay, self.fail = delay, fail
        self.lock = threading.Lock()

    def info(self) -> dict:
        return {"fingerprint": "fp-counting"}

    def answer(self, qs):
        with self.lock:
            self.asked += [x.messages[-1]["content"] for x in qs]
        time.sleep(self.delay)
        out = []
        for x in qs:
            text = x.messages[-1]["content"]
            out.append(Completion.failed(x.id, self.name, "boom") if text in self.fail else
                       Completion(query_id=x.id, teacher=self.name, text=f"A:{text}", token_ids=[1, 2, 3]))
        return out


def test_keys_cover_teacher_prompt_context_and_decoding():
    a = q("hi")
    assert ledger_key("fp", a) == ledger_key("fp", q("hi")) != ledger_key("other", a)
    assert ledger_key("fp", a) != ledger_key("fp", q("hi", max_new_tokens=9))
    assert ledger_key("fp", a) != ledger_key("fp", Query(messages=a.messages, context="Shop opens at 9."))
    assert ledger_key("fp", q("hi", temperature=0.7, seed=1)) != ledger_key("fp", q("hi", temperature=0.7, seed=2))
    assert ledger_key("fp", q("hi", temperature=0.7, seed=1, n=2)) != ledger_key("fp", q("hi", temperature=0.7,
                                                                                       seed=1))
    assert ledger_key("fp", q("hi", temperature=0.7)) is None     # an unseeded draw is never reused


def test_answers_are_paid_once_and_failures_are_asked_again(redis_server):
    ledger = QueryLedger(redis_server.url, lease_s=5)
    first, second = CountingTeacher(fail={"bad"}), CountingTeacher()
    t1, t2 = LedgerTeacher(first, ledger), LedgerTeacher(second, ledger)
    batch = [q("one"), q("two"), q("bad"), q("draw", temperature=0.9)]
    rows = t1.generate(queries_to_table(batch)).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok"]
    again = Query(messages=[{"role": "user", "content": "one"}], id="another-id")   # same prompt, another run's id
    rows2 = t2.generate(queries_to_table([again, q("two"), q("bad"), q("draw", temperature=0.9)])).to_pylist()
    assert second.asked == ["bad", "draw"]        # the failure and the unseeded draw; one and two came stored
    assert rows2[0]["query_id"] == "another-id" and rows2[0]["text"] == "A:one" and rows2[0]["token_ids"] == [1, 2, 3]
    assert t2.info()["ledger_hits"] == 2 and t2.info()["tokens_saved"] == 6


def test_a_prompt_in_flight_is_not_sent_twice_and_a_dead_claim_is_taken_over(redis_server):
    ledger = QueryLedger(redis_server.url, lease_s=2)
    slow, other = CountingTeacher(delay=1.5), CountingTeacher()
    t1, t2 = LedgerTeacher(slow, ledger, wait_s=0.1), LedgerTeacher(other, ledger, wait_s=0.1)
    table = queries_to_table([q("shared")])
    worker = threading.Thread(target=t1.generate, args=(table,))
    worker.start()
    time.sleep(0.3)                                 # t1 holds the claim and is generating
    rows = t2.generate(table).to_pylist()           # t2 waits for t1's answer instead of paying again
    worker.join()
    assert slow.asked == ["shared"] and other.asked == [] and rows[0]["text"] == "A:shared"
    assert t2.info()["ledger_waits"] >= 1
    # a replica that claimed a prompt and died: its lease runs out and another replica answers it
    assert ledger.claim(ledger_key("fp-counting", q("orphan")), "dead-replica")
    t0 = time.monotonic()
    rows = t2.generate(queries_to_table([q("orphan")])).to_pylist()
    assert other.asked == ["orphan"] and rows[0]["status"] == "ok" and 1.0 < time.monotonic() - t0 < 10


def test_usage_counts_spend_only_for_answers_a_teacher_was_asked_for():
    row = {"query_id": "a", "teacher": "api", "replica": "api/0", "status": "ok", "prompt_tokens": 600,
           "completion_tokens": 400, "latency_s": 1.0}
    rows = [row, {**row, "query_id": "b", "latency_s": 3.0},
            {**row, "query_id": "c", "status": "failed", "prompt_tokens": 0, "completion_tokens": 0,
             "latency_s": None},
            {**row, "query_id": "d", "replica": "ledger", "latency_s": 0.0},
            {**row, "teacher": "local", "replica": "local/0"}]
    api, local = teacher_usage(rows, {"api": 0.5})
    assert (api["prompts"], api["answers"], api["failed"], api["from_ledger"]) == (4, 2, 1, 1)
    assert (api["prompt_tokens"], api["completion_tokens"], api["spend"]) == (1200, 800, 1.0)  # ledger row free
    assert (api["latency_p50_s"], api["latency_p95_s"]) == (1.0, 3.0)   # over the answered rows only
    assert local["spend"] == 0.0 and local["answers"] == 1
    table = format_usage([api, local])
    assert table[2].startswith("| api | 4 | 2 | 1 | 1 | 1200 / 800 |") and table[2].endswith("| 1.0000 |")


@pytest.mark.integration
def test_a_second_identical_run_costs_zero_teacher_tokens(ray_session, tiny_model_dir, tmp_path, redis_server):
    """Two runs with the same openai teacher (Backpack's own StudentServer as the endpoint) and one Redis server:
    the second run stores the same answers and sends the endpoint nothing."""
    from backpack.config import ServeConfig, StudentConfig
    from backpack.data.store import DatasetStore
    from backpack.run.generate import generate
    from backpack.serve.server import StudentServer

    ray = ray_session
    server = ray.remote(StudentServer).options(num_cpus=0).remote(StudentConfig(base=tiny_model_dir),
                                                                 ServeConfig(port=0, max_new_tokens=6))
    try:
        url = ray.get(server.start.remote(), timeout=180) + "/v1"

        def run(name: str):
            cfg = validate_config({
                "name": name, "storage": {"path": str(tmp_path)}, "redis": {"url": redis_server.url},
                "teachers": [{"name": "api", "backend": "openai", "model": "student", "num_cpus": 0.1,
                              "batch_size": 4, "endpoint": {"base_url": url, "concurrency": 2}}],
                "prompts": {"path": str(EXAMPLES / "prompts.jsonl"), "limit": 5},
                "decoding": {"max_new_tokens": 5}})
            return generate(cfg), DatasetStore(cfg.dataset_dir).read().to_pylist(), cfg

        first, rows1, cfg1 = run("ledger-a")
        asked = ray.get(server.info.remote())["requests"]
        second, rows2, cfg2 = run("ledger-b")
        assert first.ok_rows == second.ok_rows == 5 and asked == 5
        assert ray.get(server.info.remote())["requests"] == asked        # zero requests: zero teacher tokens
        assert sorted(r["text"] for r in rows1) == sorted(r["text"] for r in rows2)
        assert {r["replica"] for r in rows2} == {"ledger"}                # each row says the ledger answered it
        # the replicas' counters are on record for `backpack status` and the report
        from backpack.run.ops import format_status, replicas_of, status

        assert replicas_of(cfg1)["api/0"] == {"backend": "openai", "requests": 5}
        assert replicas_of(cfg2)["api/0"] | {"ledger_hits": 5} == replicas_of(cfg2)["api/0"]
        assert "openai: ledger_hits 5" in format_status(status(cfg2))
    finally:
        ray.kill(server)


def test_claims_are_compare_and_act_and_a_corrupt_answer_is_a_miss(redis_server):
    ledger = QueryLedger(redis_server.url, lease_s=30)
    key = ledger_key("fp-counting", q("x"))
    assert ledger.claim(key, "a") and not ledger.claim(key, "b")
    ledger.release([key], "b")  # not b's: nothing happens
    ledger.renew([key], "b")
    assert ledger.client.get(f"{key}:claim") == "a"
    ledger.release([key], "a")
    assert ledger.client.get(f"{key}:claim") is None
    # an answer stored between a replica's lookup and its claim: the claim is won, then the answer is found
    ledger.store(key, [Completion(query_id="x", teacher="t", text="A:x", token_ids=[1])])
    late = CountingTeacher()
    replica = LedgerTeacher(late, ledger)
    real_lookup, looks = ledger.lookup, []
    ledger.lookup = lambda keys: looks.append(keys) or ([None] * len(keys) if len(looks) == 1 else real_lookup(keys))
    rows = replica.generate(queries_to_table([q("x")])).to_pylist()
    ledger.lookup = real_lookup
    assert late.asked == [] and rows[0]["text"] == "A:x" and ledger.client.get(f"{key}:claim") is None
    # one corrupt value (another version, a bad write) is a miss: answered again, and replaced
    bad = ledger_key("fp-counting", q("corrupt"))
    for raw in ('{"not": "a list"', '[{"unknown_field": 1}]', '"text"'):
        ledger.client.set(f"{bad}:done", raw)
        assert ledger.lookup([bad]) == [None]
    teacher = CountingTeacher()
    rows = LedgerTeacher(teacher, ledger).generate(queries_to_table([q("corrupt")])).to_pylist()
    assert teacher.asked == ["corrupt"] and rows[0]["text"] == "A:corrupt"
    assert ledger.lookup([bad])[0][0].text == "A:corrupt"


def test_renewals_survive_a_redis_error_and_waiters_have_a_deadline(redis_server):
    ledger = QueryLedger(redis_server.url, lease_s=3)  # renewed every second; the first renewal fails
    errors = {"n": 0}
    real_renew = ledger.renew

    def flaky_renew(keys, owner):
        if errors["n"] < 1:
            errors["n"] += 1
            raise ConnectionError("Redis went away for a moment")
        real_renew(keys, owner)
    ledger.renew = flaky_renew
    slow = CountingTeacher(delay=5.0)
    table = queries_to_table([q("long")])
    worker = threading.Thread(target=LedgerTeacher(slow, ledger).generate, args=(table,))
    worker.start()
    time.sleep(4.0)  # past the first lease: only renewals after the failed one keep the claim
    assert errors["n"] == 1 and ledger.client.get(f"{ledger_key('fp-counting', q('long'))}:claim") is not None
    worker.join()
    # an owner that holds its claim and never answers: a waiter answers it itself after max_wait_s
    stuck = ledger_key("fp-counting", q("stuck"))
    assert ledger.claim(stuck, "alive-but-stuck")
    ledger.client.expire(f"{stuck}:claim", 600)
    other = CountingTeacher()
    rows = LedgerTeacher(other, ledger, wait_s=0.05, max_wait_s=0.5).generate(
        queries_to_table([q("stuck")])).to_pylist()
    assert other.asked == ["stuck"] and rows[0]["status"] == "ok"


def test_the_wait_for_another_replicas_answer_comes_from_the_config():
    from backpack.teachers.ledger import run_ledger

    base = {"name": "wait", "teachers": [{"name": "t", "backend": "hf", "model": "default"}],
            "prompts": {"path": str(EXAMPLES / "prompts.jsonl")}}
    default = run_ledger(validate_config({**base, "ledger": {"use": "always", "lease_s": 4}}), "redis://x")
    assert default.max_wait_s == 20  # 5 x lease_s
    set_ = run_ledger(validate_config({**base, "ledger": {"use": "always", "max_wait_s": 7.5}}), "redis://x")
    assert set_.max_wait_s == 7.5 and LedgerTeacher(CountingTeacher(), set_).max_wait_s == 7.5
