"""A teacher as judge: reading verdicts and scores from malformed replies, both-orders aggregation, and
`backpack eval --judge` against a scripted judge (a real HTTP server, through the openai teacher and the
scheduler), with unreadable replies asked again once."""

import json
import math

import pyarrow.parquet as pq
import pytest

from backpack.config import validate_config
from backpack.errors import InputError
from backpack.eval.judge import (aggregate_pairwise, pairwise_messages, parse_rubric, parse_verdict, reask_messages,
                                 rubric_messages)

from conftest import EXAMPLES, run_main, scripted_http


def test_verdicts_and_scores_are_read_or_left_unparsed():
    assert parse_verdict("A is clearer.\nVerdict: B") == "B"
    assert parse_verdict("**Verdict:** tie") == "tie"
    assert parse_verdict("Verdict: A ... on reflection, Verdict: [B]") == "B"  # the last one counts
    for bad in ("", "Answer A is better.", "Verdict: neither", "verdict - C", None):
        assert parse_verdict(bad) is None
    assert parse_rubric("Score: 8/10\nReason: correct and short.") == (8.0, "correct and short.")
    assert parse_rubric("score - 3") == (3.0, "")
    for bad in ("Score: 11", "Score: 0", "I like it.", "Reason: fine", None):
        assert parse_rubric(bad) is None


def test_both_orders_cancel_a_position_bias_and_ties_count_half():
    # prompt 0: the student wins in both orders; 1: loses both; 2: a judge that always says A (inconsistent);
    # 3: tie and win; 4: unparsed in one order (not scored)
    first = ["A", "B", "A", "tie", None]
    second = ["B", "A", "A", "B", "B"]
    r = aggregate_pairwise(first, second)
    assert (r.judged, r.unparsed, r.wins, r.losses, r.ties, r.inconsistent) == (4, 1, 2, 1, 1, 1)
    assert r.win_rate == pytest.approx((1 + 0 + 0.5 + 0.75) / 4)
    points = [1, 0, 0.5, 0.75]
    sd = math.sqrt(sum((p - r.win_rate) ** 2 for p in points) / 3)
    assert r.ci95 == pytest.approx(1.96 * sd / 2)
    with pytest.raises(ValueError):
        aggregate_pairwise(["A"], [])


def test_judge_prompts_hold_both_answers_and_the_reference():
    text = pairwise_messages("Q?", "ours", "theirs")[0]["content"]
    assert text.index("ours") < text.index("theirs") and "Verdict: tie" in text
    guided = rubric_messages("Q?", "ours", "the reference")[0]["content"]
    assert "the reference" in guided and "reference answer as the standard" in guided
    assert "Reference" not in rubric_messages("Q?", "ours")[0]["content"]
    again = reask_messages([{"role": "user", "content": "x"}], "hmm", "rubric")
    assert [m["role"] for m in again] == ["user", "assistant", "user"] and "Score:" in again[-1]["content"]


@pytest.fixture
def scripted_judge():
    """An OpenAI-compatible judge that prefers whatever answer comes first and first replies to a rubric
    request without a score (so each is asked again)."""
    seen = []

    def answer(body, headers):
        last = body["messages"][-1]["content"]
        seen.append(last)
        if last.startswith("Give only two lines"):
            reply = "Score: 7\nReason: fine."
        elif "strict judge of tasks" in last:  # synthesis's judge filter: one good prompt, one bad
            reply = "Score: 2\nReason: vague." if "why rain" in last else "The task is clear. Score: 8\nReason: clear."
        elif "answered these tasks badly" in last:  # `synthesize` from the failures the judge found
            reply = "1. Name a red fruit and say when it is ripe.\n2. Explain why rain falls in drops."
        elif "Rate the answer" in last:
            reply = "It is an answer."
        else:
            reply = "The first is better.\nVerdict: A"
        return 200, {"choices": [{"index": 0, "message": {"content": reply}, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 5}}, {"Content-Type": "application/json"}

    with scripted_http(answer) as url:
        yield seen, url


@pytest.mark.integration
def test_eval_judge_against_a_scripted_judge(ray_session, tiny_model_dir, tmp_path, scripted_judge, capsys):
    from backpack.run.generate import generate

    seen, url = scripted_judge
    data = {
        "name": "judged", "storage": {"path": str(tmp_path)},
        "teachers": [{"name": "tiny", "model": tiny_model_dir, "replicas": 1, "batch_size": 8, "threads": 1,
                      "num_cpus": 0.5},
                     {"name": "judge", "backend": "openai", "model": "scripted", "endpoint": {"base_url": url}}],
        "prompts": {"path": str(EXAMPLES / "prompts.jsonl"), "limit": 12},
        "decoding": {"max_new_tokens": 4},
        "student": {"base": tiny_model_dir, "mode": "full"},
        "eval": {"heldout_fraction": 0.3, "max_rows": 3, "max_new_tokens": 4}}
    cfg = validate_config({**data, "teachers": data["teachers"][:1]})
    generate(cfg)  # the tiny teacher's answers: the references the student's are compared with
    path = tmp_path / "judged.yaml"
    path.write_text(json.dumps(data))
    out = run_main(capsys, "eval", str(path), "--judge", "judge")
    assert out.returncode == 0, out.stderr
    summary = json.loads((cfg.run_dir / "eval" / "judge-judge.json").read_text())
    v0 = summary["0"]
    n = v0["prompts"]
    assert n >= 1
    # a judge that always prefers the first answer: every prompt is a win and a loss, so the win rate is 0.5
    p = v0["pairwise"]
    assert (p["judged"], p["inconsistent"], p["win_rate"], p["unparsed"]) == (n, n, 0.5, 0)
    # each rubric reply had no score: asked again once, then read
    assert v0["rubric"]["mean"] == 7 and v0["rubric"]["judged"] == n and v0["reasked"] == n
    assert sum(s.startswith("Give only two lines") for s in seen) == n
    assert "judged by judge" in out.stdout and "0 | 0.500" in out.stdout
    assert "## Judged by judge" in (cfg.run_dir / "report" / "report.md").read_text()
    # the judge's requests and replies are rows of the run's judge dataset
    from backpack.data.store import DatasetStore

    rows = DatasetStore(cfg.run_dir / "judge", create=False).read()
    # (per prompt: two orders, or one where both answers are the same text, a score and its re-ask)
    assert 3 * n <= rows.num_rows <= 4 * n and set(rows.column("teacher").to_pylist()) == {"judge"}
    # asked again, nothing new goes to the judge (stored replies are reused)
    before = len(seen)
    assert run_main(capsys, "eval", str(path), "--judge", "judge").returncode == 0
    assert len(seen) == before
    # where the student did worst, per prompt: synthesis.source failures asks for new prompts near those
    weak = v0["per_prompt"]
    assert len(weak) == n and all(w["points"] == 0.5 and w["score"] == 7 and w["prompt"] for w in weak)
    synthesis = {"source": "failures", "teacher": "judge", "target": 2, "rounds": 1, "requests_per_round": 1,
                 "per_request": 2, "judge": "judge", "filters": {"min_judge_score": 5}}
    path.write_text(json.dumps({**data, "synthesis": synthesis}))
    out = run_main(capsys, "synthesize", str(path))
    assert out.returncode == 0, out.stderr
    v1 = cfg.run_dir / "synthesis" / "v1"
    kept = pq.read_table(v1 / "prompts.parquet").to_pylist()
    assert [k["prompt"] for k in kept] == ["Name a red fruit and say when it is ripe."]
    assert kept[0]["source"] == "failures" and set(kept[0]["seed_ids"]) <= {w["id"] for w in weak}
    rejected = pq.read_table(v1 / "rejected.parquet").to_pylist()
    assert [(r["text"], r["reason"]) for r in rejected] == [("Explain why rain falls in drops.", "judge")]
    assert json.loads((v1 / "funnel.json").read_text())["funnel"][-1] == ["judge", 1]
    asked = next(s for s in seen if "answered these tasks badly" in s)
    assert all(w["prompt"] in asked for w in weak)  # 3 weak prompts, seeds_shown 3: all shown
    # the first score reply had text before its score line and was read; the judge's rows are stored
    assert DatasetStore(cfg.run_dir / "synthesis" / "judged", create=False).read().num_rows == 2


def test_a_judge_that_is_not_a_teacher_or_is_the_student_is_refused(tmp_path, tiny_model_dir):
    from backpack.run.judge import judge_teacher

    cfg = validate_config({"name": "j", "storage": {"path": str(tmp_path)},
                           "teachers": [{"name": "t", "model": tiny_model_dir}],
                           "prompts": {"path": str(EXAMPLES / "prompts.jsonl")}})
    with pytest.raises(InputError, match="--judge 'gpt' is not a teacher of run 'j' .its teachers: t"):
        judge_teacher(cfg, "gpt")
    student = cfg.run_dir / "students" / "v1"
    student.mkdir(parents=True)
    (student / "config.json").write_text("{}")
    cfg = validate_config({**cfg.model_dump(include={"name", "storage", "prompts"}),
                           "teachers": [{"name": "self", "model": str(student)}]}, check_files=False)
    with pytest.raises(InputError, match="is the run's own student"):
        judge_teacher(cfg, "self")
