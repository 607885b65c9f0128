"""Teachers score completions they did not write (on-policy distillation): the hf teacher's scores equal a plain
forward pass of each (prompt, completion) on its own, through the prefill path and the plain one; a completion
too long for the context fails alone; scores are paid once through the ledger; and a batch of scoring Queries
goes through the real scheduler and a real teacher actor like any other."""

import pytest
import torch

from backpack.config import TeacherConfig
from backpack.core.chat import encode_chat, with_context
from backpack.core.schema import queries_to_table
from backpack.core.types import DecodingParams, Query
from backpack.teachers import score as score_module
from backpack.teachers.hf import HFTeacher

PROMPTS = ["What is the capital of France?", "Say hello.", "Name three fruits, please, one per line.",
           "What is 2 plus 2?"]


@pytest.fixture(scope="module")
def smol(smol_dir):
    return HFTeacher(TeacherConfig(name="smol", threads=2, batch_size=4))


def scoring_queries(teacher, k=3, context=None) -> list[Query]:
    """The teacher's own greedy answers to PROMPTS (and one arbitrary run of tokens), as Queries to score."""
    written = teacher.generate(queries_to_table([
        Query(messages=[{"role": "user", "content": p}], decoding=DecodingParams(max_new_tokens=12))
        for p in PROMPTS])).to_pylist()
    completions = [r["token_ids"] for r in written] + [[12, 345, 6789, 42, 7]]
    prompts = PROMPTS + ["Anything at all."]
    return [Query(messages=[{"role": "user", "content": p}], decoding=DecodingParams(logprobs=k), score_ids=c,
                  context=context, student_version=3) for p, c in zip(prompts, completions)]


def reference(teacher, q: Query, k: int):
    """Logprobs of q.score_ids from one plain forward of the prompt + completion alone."""
    prompt = encode_chat(teacher.tokenizer, with_context(q.messages, q.context))
    ids = torch.tensor([prompt + list(q.score_ids)])
    with torch.inference_mode():
        logp = teacher.model(input_ids=ids).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
    chosen = logp.gather(1, torch.tensor(q.score_ids)[:, None]).squeeze(1)
    top_lp, top_ids = logp.topk(k, dim=-1)
    return chosen.tolist(), top_ids.tolist(), top_lp.tolist()


def check_against_reference(teacher, qs, rows, k=3):
    assert [r["query_id"] for r in rows] == [q.id for q in qs]
    for q, r in zip(qs, rows):
        chosen, top_ids, top_lps = reference(teacher, q, k)
        assert r["status"] == "ok" and r["token_ids"] == list(q.score_ids)
        assert r["score_ids"] == list(q.score_ids) and r["student_version"] == 3
        assert r["token_logprobs"] == pytest.approx(chosen, abs=2e-4)
        assert r["top_ids"] == top_ids
        assert [lp for row in r["top_logprobs"] for lp in row] == pytest.approx(
            [lp for row in top_lps for lp in row], abs=2e-4)


def test_scores_equal_a_plain_forward_token_for_token(smol):
    qs = scoring_queries(smol)
    rows = smol.generate(queries_to_table(qs)).to_pylist()
    check_against_reference(smol, qs, rows)
    # the teacher's own greedy tokens are its argmax at every position
    for r in rows[:len(PROMPTS)]:
        assert [t[0] for t in r["top_ids"]] == r["token_ids"]


def test_the_plain_path_scores_the_same(smol, monkeypatch):
    monkeypatch.setattr(score_module, "supports", lambda model: False)
    qs = scoring_queries(smol)
    check_against_reference(smol, qs, smol.generate(queries_to_table(qs)).to_pylist())


def test_scoring_and_writing_in_one_batch_and_a_completion_past_the_context(tiny_model_dir):
    t = HFTeacher(TeacherConfig(name="tiny", model=tiny_model_dir, batch_size=2))
    written = Query(messages=[{"role": "user", "content": "Hi."}], decoding=DecodingParams(max_new_tokens=4))
    scored = Query(messages=[{"role": "user", "content": "Hi."}], decoding=DecodingParams(logprobs=2),
                   score_ids=[5, 6, 7])
    too_long = Query(messages=[{"role": "user", "content": "Hi."}], score_ids=[5] * (t.context + 1))
    rows = t.generate(queries_to_table([scored, written, too_long])).to_pylist()
    assert [r["query_id"] for r in rows] == [scored.id, written.id, too_long.id]
    assert rows[0]["token_ids"] == [5, 6, 7] and len(rows[0]["top_ids"]) == 3 and rows[1]["score_ids"] is None
    assert rows[2]["status"] == "failed" and "completion to score" in rows[2]["error"]
    assert scored.id != Query(messages=scored.messages, decoding=scored.decoding, score_ids=[5, 6, 8]).id


@pytest.mark.integration
def test_scoring_goes_through_the_scheduler_and_is_paid_once(ray_session, tiny_model_dir, redis_server, tmp_path):
    """Scoring Queries routed by the real scheduler over two real teacher actors, stored as on-policy rows equal to
    the in-process teacher's scores; a second run of the same scores is answered by the ledger alone."""
    from backpack.config.teachers import LedgerConfig
    from backpack.data.store import DatasetStore
    from backpack.run.actors import spawn_scheduler
    from backpack.run.pool import TeacherPool
    from backpack.teachers.ledger import QueryLedger

    cfg = TeacherConfig(name="tiny", model=tiny_model_dir, replicas=2, batch_size=2, threads=1, num_cpus=1)
    local = HFTeacher(TeacherConfig(name="tiny", model=tiny_model_dir, batch_size=8))
    qs = [Query(messages=[{"role": "user", "content": f"Question {i}?"}], decoding=DecodingParams(logprobs=4),
                score_ids=[100 + i, 200 + i, 300 + i], student_version=7) for i in range(6)]
    expected = {r["query_id"]: r for r in local.generate(queries_to_table(qs)).to_pylist()}
    pool = TeacherPool([cfg], ledger=QueryLedger(redis_server.url, lease_s=5), ledger_config=LedgerConfig(use="always"))
    try:
        pool.start()
        for run in ("first", "again"):
            store = DatasetStore(tmp_path / run)
            sched = spawn_scheduler(pool.replicas, store, None, policy="round_robin", flush_rows=2)
            summary = ray_session.get(sched.run.remote(queries_to_table(qs)), timeout=300)
            rows = store.read().to_pylist()
            assert summary["ok_rows"] == 6 and sorted(r["query_id"] for r in rows) == sorted(expected)
            for r in rows:
                want = expected[r["query_id"]]
                assert r["score_ids"] == r["token_ids"] == want["token_ids"] and r["student_version"] == 7
                assert r["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-4)
                assert r["top_ids"] == want["top_ids"]
            replicas = {r["replica"] for r in rows}
            assert replicas == ({"tiny/0", "tiny/1"} if run == "first" else {"ledger"})
        assert sum(c.get("ledger_hits", 0) for c in pool.counters().values()) == 6
    finally:
        pool.shutdown()
