"""The `openai` teacher: request and response mapping, rate limits and backoff (pure), failure handling against
a scripted HTTP server (429 then success, 401, 400 for one prompt, garbage, a dead endpoint), and real answers
from Backpack's own StudentServer, alone and through `generate` with the scheduler."""

import random
import threading

import pyarrow as pa
import pytest

from backpack.config import TeacherConfig, validate_config
from backpack.core.schema import queries_to_table
from backpack.core.types import DecodingParams, Query
from backpack.errors import ConfigError, TeacherError
from backpack.teachers.openai import (EndpointError, OpenAITeacher, parse_response, parse_scores, request_body,
                                      score_body)
from backpack.teachers.ratelimit import RateLimiter, backoff_s

from conftest import EXAMPLES, scripted_http


def q(text: str, **decoding) -> Query:
    return Query(messages=[{"role": "user", "content": text}], decoding=DecodingParams(**decoding))


def test_request_body_maps_decoding_and_puts_the_context_first():
    query = Query(messages=[{"role": "user", "content": "hi"}], context="Shop opens at 9.",
                  decoding=DecodingParams(max_new_tokens=7, temperature=0.5, top_p=0.9, n=2, seed=3, logprobs=4))
    body = request_body(query, "m")
    assert body["messages"][0] == {"role": "system", "content": "Shop opens at 9."}
    assert body["messages"][1]["content"] == "hi"
    assert {k: body[k] for k in ("model", "max_tokens", "temperature", "top_p", "n", "seed", "logprobs",
                                 "top_logprobs")} == {"model": "m", "max_tokens": 7, "temperature": 0.5,
                                                      "top_p": 0.9, "n": 2, "seed": 3, "logprobs": True,
                                                      "top_logprobs": 4}
    assert "n" not in request_body(q("x"), "m") and "top_k" not in request_body(q("x"), "m")


def test_parse_response_choices_usage_logprobs_and_garbage():
    query = q("x", n=2)
    payload = {"choices": [
        {"index": 1, "message": {"content": "b"}, "finish_reason": "length"},
        {"index": 0, "message": {"content": "a"}, "finish_reason": "stop",
         "logprobs": {"content": [{"token": "a", "logprob": -0.25, "top_logprobs": []}]}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 6}}
    a, b = parse_response(query, payload, "t", "t/0", "fp")
    assert (a.text, a.sample_index, a.finish_reason, a.token_logprobs) == ("a", 0, "stop", [-0.25])
    assert (b.text, b.finish_reason, b.prompt_tokens, b.completion_tokens) == ("b", "length", 9, 3)
    for garbage in ({"error": "nope"}, {"choices": []}, {"choices": [{"message": {"content": None}}]}, "<html>"):
        with pytest.raises(EndpointError, match="not a chat completion|no choices"):
            parse_response(query, garbage, "t", "t/0", "fp")


def test_scoring_requests_and_answers_as_a_vllm_server_gives_them():
    query = Query(messages=[{"role": "user", "content": "hi"}], decoding=DecodingParams(logprobs=2), score_ids=[7, 8])
    body = score_body([1, 2, 3], query, "m")
    assert (body["prompt"], body["echo"], body["max_tokens"], body["logprobs"]) == ([1, 2, 3, 7, 8], True, 0, 2)
    entry = lambda lp, rank: {"logprob": lp, "rank": rank, "decoded_token": "x"}  # noqa: E731
    payload = {"choices": [{"text": "...", "prompt_logprobs": [
        None, {"2": entry(-1.0, 1)}, {"3": entry(-2.0, 1)},
        {"7": entry(-0.5, 1), "9": entry(-1.5, 2)},                        # the scored token is the top one
        {"4": entry(-0.1, 1), "5": entry(-3.0, 2), "8": entry(-4.0, 7)}]}]}  # ... or outside the top k
    c = parse_scores(query, payload, 3, "t", "t/0", "fp")
    assert c.token_ids == [7, 8] and c.token_logprobs == [-0.5, -4.0]
    assert c.top_ids == [[7, 9], [4, 5]] and c.top_logprobs == [[-0.5, -1.5], [-0.1, -3.0]]
    for garbage in ({"choices": [{"text": "no logprobs"}]}, {"choices": [{"prompt_logprobs": [None] * 4}]}, "<html>"):
        with pytest.raises(EndpointError, match="no prompt logprobs to score with"):
            parse_scores(query, garbage, 3, "t", "t/0", "fp")


def test_an_endpoint_that_cannot_score_says_so_naming_the_teacher():
    t = OpenAITeacher(TeacherConfig(name="api", backend="openai", model="m",
                                    endpoint={"base_url": "http://127.0.0.1:9/v1"}))
    scoring = Query(messages=[{"role": "user", "content": "hi"}], score_ids=[1, 2])
    with pytest.raises(TeacherError, match="teacher 'api' .openai at http://127.0.0.1:9/v1. cannot score"):
        t.generate(queries_to_table([scoring]))


def test_rate_limiter_holds_requests_and_tokens_to_their_budgets():
    now = [0.0]
    waits = []
    lim = RateLimiter(requests_per_minute=60, tokens_per_minute=600, clock=lambda: now[0],
                      sleep=lambda s: (waits.append(s), now.__setitem__(0, now[0] + s)))
    for _ in range(60):          # a full minute's requests at once (10 tokens each: 600)
        lim.acquire(10)
    assert waits == [] and lim.delay(10) == pytest.approx(1.0)   # the 61st waits for a second's refill
    lim.acquire(10)
    assert sum(waits) == pytest.approx(1.0)
    now[0] += 60                                                 # a minute later: room again, up to the caps
    assert lim.delay(600) == 0 and lim.delay(1) > 0              # the token bucket was emptied by that one
    assert RateLimiter().delay(10 ** 9) == 0                     # no limits


def test_backoff_grows_with_jitter_caps_and_respects_retry_after():
    rng = random.Random(0)
    delays = [backoff_s(a, base_s=1.0, cap_s=8.0, rng=rng) for a in range(6)]
    for attempt, d in enumerate(delays):
        full = min(8.0, 2.0 ** attempt)
        assert full / 2 <= d <= full
    assert backoff_s(0, base_s=1.0, retry_after_s=5.0, rng=rng) == 5.0


def test_endpoint_config_is_validated():
    base = {"name": "x", "teachers": [{"name": "api", "backend": "openai", "model": "m"}]}
    with pytest.raises(ConfigError, match="needs an endpoint"):
        validate_config(base)
    bad = {"name": "x", "teachers": [{"name": "api", "backend": "openai", "model": "m",
                                      "endpoint": {"base_url": "api.example.com", "api_key_env": "sk-123 abc",
                                                   "concurrency": 0}}]}
    with pytest.raises(ConfigError) as e:
        validate_config(bad)
    text = str(e.value)
    assert "not an http(s) URL" in text and "not an environment variable name" in text and "concurrency" in text
    with pytest.raises(ConfigError, match="endpoint is for backend 'openai'"):
        validate_config({"name": "x", "teachers": [{"name": "t", "endpoint": {"base_url": "http://h/v1"}}]})
    with pytest.raises(ConfigError, match="endpoint is for backend 'openai' .this teacher's backend is 'vllm'"):
        validate_config({"name": "x", "teachers": [{"name": "t", "backend": "vllm",
                                                    "endpoint": {"base_url": "http://h/v1"}}]})


# ---------------------------------------------------------------- against a scripted server


class Script:
    """What the scripted server answers: `plan` maps a prompt to a list of (status, body, headers), used in
    order (the last one repeats); anything else is a normal answer."""

    def __init__(self):
        self.plan: dict[str, list] = {}
        self.seen: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def answer(self, prompt: str, auth: str):
        with self.lock:
            self.seen.append((prompt, auth))
            steps = self.plan.get(prompt)
            if steps:
                return steps.pop(0) if len(steps) > 1 else steps[0]
        if auth != "Bearer sekrit":
            return 401, {"error": {"message": "Incorrect API key provided"}}, {}
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"echo: {prompt}"},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 5, "completion_tokens": 3}}, {}


@pytest.fixture
def scripted():
    script = Script()
    with scripted_http(lambda body, headers: script.answer(body["messages"][-1]["content"],
                                                           headers.get("Authorization"))) as url:
        yield script, url


def teacher(url: str, monkeypatch, **endpoint) -> OpenAITeacher:
    monkeypatch.setenv("TEST_API_KEY", "sekrit")
    cfg = TeacherConfig(name="api", backend="openai", model="m",
                        endpoint={"base_url": url, "api_key_env": "TEST_API_KEY", "backoff_s": 0.01, **endpoint})
    return OpenAITeacher(cfg)


def rows(t: OpenAITeacher, *prompts: str) -> list[dict]:
    return t.generate(queries_to_table([q(p) for p in prompts])).to_pylist()


def test_retries_429_and_5xx_then_answers(scripted, monkeypatch):
    script, url = scripted
    script.plan["busy"] = [(429, {"error": {"message": "Rate limit reached"}}, {"Retry-After": "0"}),
                           (503, "overloaded", {}), (200, {"choices": [{"message": {"content": "finally"}}]}, {})]
    t = teacher(url, monkeypatch)
    out = rows(t, "busy", "calm")
    assert [r["status"] for r in out] == ["ok", "ok"] and out[0]["text"] == "finally"
    assert out[1]["text"] == "echo: calm" and out[1]["completion_tokens"] == 3 and out[1]["prompt_tokens"] == 5
    assert t.info()["retries"] == 2 and [p for p, _ in script.seen].count("busy") == 3
    assert all(auth == "Bearer sekrit" for _, auth in script.seen)   # the key from the named variable


def test_a_query_the_endpoint_rejects_fails_alone(scripted, monkeypatch):
    script, url = scripted
    script.plan["huge"] = [(400, {"error": {"message": "maximum context length is 8 tokens"}}, {})]
    script.plan["junk"] = [(200, "<html>gateway</html>", {})]
    out = rows(teacher(url, monkeypatch), "huge", "fine", "junk")
    assert [r["status"] for r in out] == ["failed", "ok", "failed"]
    assert "answered 400: maximum context length is 8 tokens" in out[0]["error"]
    assert "not JSON" in out[2]["error"]


def test_teacher_level_failures_raise_so_the_batch_is_rerouted(scripted, monkeypatch):
    script, url = scripted
    monkeypatch.setenv("WRONG_KEY", "nope")
    cfg = TeacherConfig(name="api", backend="openai", model="m",
                        endpoint={"base_url": url, "api_key_env": "WRONG_KEY", "backoff_s": 0.01})
    with pytest.raises(TeacherError, match="answered 401: Incorrect API key provided .check the key in WRONG_KEY"):
        rows(OpenAITeacher(cfg), "a", "b")
    script.plan["a"] = script.plan["b"] = [(503, "down", {})]
    t = teacher(url, monkeypatch, max_retries=2)
    with pytest.raises(TeacherError, match="gave up after 2 retries"):
        rows(t, "a", "b")
    dead = teacher("http://127.0.0.1:9/v1", monkeypatch, max_retries=1)   # nothing listens there
    with pytest.raises(TeacherError, match="cannot reach"):
        rows(dead, "a")
    keyed = teacher("http://127.0.0.1:9/v1?api_key=hunter2", monkeypatch, max_retries=1)  # a gateway's key
    with pytest.raises(TeacherError, match="cannot reach") as e:
        rows(keyed, "a")
    assert "hunter2" not in str(e.value)
    monkeypatch.delenv("TEST_API_KEY")
    with pytest.raises(TeacherError, match="TEST_API_KEY .endpoint.api_key_env. holding the API key is not set"):
        OpenAITeacher(TeacherConfig(name="api", backend="openai", model="m",
                                    endpoint={"base_url": url, "api_key_env": "TEST_API_KEY"}))


# ---------------------------------------------------------------- against Backpack's own StudentServer


@pytest.mark.integration
def test_answers_from_the_student_server_alone_and_through_generate(ray_session, tiny_model_dir, tmp_path):
    from backpack.config import ServeConfig, StudentConfig
    from backpack.data.store import DatasetStore
    from backpack.run.generate import generate
    from backpack.serve.server import StudentServer

    ray = ray_session
    server = ray.remote(StudentServer).options(num_cpus=0).remote(StudentConfig(base=tiny_model_dir),
                                                                 ServeConfig(port=0, max_new_tokens=6))
    try:
        url = ray.get(server.start.remote(), timeout=180) + "/v1"
        endpoint = {"base_url": url, "concurrency": 2, "requests_per_minute": 600}
        t = OpenAITeacher(TeacherConfig(name="student-api", backend="openai", model="student", endpoint=endpoint))
        table = queries_to_table([Query(messages=[{"role": "user", "content": f"Say {i}."}], context="Be brief.",
                                        decoding=DecodingParams(max_new_tokens=5)) for i in range(3)])
        out = t.generate(table).to_pylist()
        assert [r["status"] for r in out] == ["ok"] * 3 and all(isinstance(r["text"], str) for r in out)
        assert all(0 < r["completion_tokens"] <= 5 and r["prompt_tokens"] > 0 for r in out)
        assert out[0]["model_fingerprint"] == f"openai:{url}:student" and t.info()["requests"] == 3
        assert isinstance(t.generate(table), pa.Table)

        cfg = validate_config({
            "name": "remote", "storage": {"path": str(tmp_path)},
            "teachers": [{"name": "student-api", "backend": "openai", "model": "student", "num_cpus": 0.1,
                          "batch_size": 4, "endpoint": endpoint}],
            "prompts": {"path": str(EXAMPLES / "prompts.jsonl"), "limit": 6},
            "decoding": {"max_new_tokens": 5}})
        gen = generate(cfg)
        assert gen.ok_rows == 6 and gen.failed_rows == 0
        stored = DatasetStore(cfg.dataset_dir).read().to_pylist()
        assert {r["teacher"] for r in stored} == {"student-api"} and all(r["token_ids"] == [] for r in stored)
        assert ray.get(server.info.remote())["requests"] == 3 + 3 + 6
    finally:
        ray.kill(server)
