"""The StudentServer on a real port: OpenAI-shaped answers, streaming, bad requests, and hot swaps of registry
versions (real Redis) while requests are in flight; once as a Ray actor."""

import asyncio
import contextlib
import json
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import torch

from backpack.config import ServeConfig, StudentConfig
from backpack.core.chat import encode_chat
from backpack.core.schema import queries_to_table
from backpack.core.types import DecodingParams, Query
from backpack.serve.server import StudentServer
from backpack.student import checkpoints
from backpack.student.autopilot import load_student
from backpack.student.registry import Registry, load_version
from backpack.teachers.hf import HFTeacher

MESSAGES = [{"role": "user", "content": "Tell me about the weather on Mars."}]
MAX = 12


@pytest.fixture
def student(tiny_model_dir):
    return StudentConfig(base=tiny_model_dir, lora_r=4)


@contextlib.asynccontextmanager
async def serving(student_cfg, registry=None, **serve):
    threads = torch.get_num_threads()  # start() sets the server's thread count; the test process gets it back
    server = StudentServer(student_cfg, ServeConfig(port=0, max_new_tokens=MAX, **serve), registry)
    url = await server.start()
    try:
        async with aiohttp.ClientSession(base_url=url) as http:
            yield server, http
    finally:
        await server.stop()
        torch.set_num_threads(threads)


async def chat(http, **body):
    async with http.post("/v1/chat/completions", json={"messages": MESSAGES, **body}) as r:
        return r.status, await r.json()


async def chat_stream(http, **body) -> list:
    """The SSE payloads of a streamed completion, in order ("[DONE]" as a string)."""
    async with http.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True, **body}) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        raw = (await r.read()).decode()
    events = [block[len("data: "):] for block in raw.split("\n\n") if block]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def streamed_text(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])


def reference_text(model, tokenizer, max_new_tokens=MAX) -> str:
    """The greedy answer through the teachers' batch generation code: an independent path to compare with."""
    gen = HFTeacher.from_model("ref", model, tokenizer, fingerprint="ref")
    q = Query(messages=MESSAGES, decoding=DecodingParams(max_new_tokens=max_new_tokens))
    return gen.generate(queries_to_table([q])).to_pylist()[0]["text"]


def publish(registry: Registry, cfg: StudentConfig, directory: Path, shift: float) -> int:
    """A registry version whose LoRA weights are moved by `shift`, so it answers unlike the base."""
    ap = load_student(cfg)
    with torch.no_grad():
        for p in ap.model.parameters():
            if p.requires_grad:
                p.add_(shift)
    state = {"step": 1, "student": cfg.model_dump()}
    checkpoints.save(directory, ap.model, state)
    return registry.publish(directory, state)


def test_completion_models_and_health(student):
    base = load_version(None, student, merge=True)
    expected = reference_text(base.model, base.tokenizer)

    async def main():
        async with serving(student) as (server, http):
            status, out = await chat(http, model="my-name", max_tokens=1000, temperature=0)
            assert status == 200
            assert out["object"] == "chat.completion" and out["model"] == "my-name" and out["id"].startswith("chatcmpl-")
            assert out["backpack"] == {"version": 0} and isinstance(out["created"], int)
            (choice,) = out["choices"]
            assert choice["message"] == {"role": "assistant", "content": expected}
            usage = out["usage"]
            assert usage["prompt_tokens"] == len(encode_chat(base.tokenizer, MESSAGES))
            assert 1 <= usage["completion_tokens"] <= MAX  # max_tokens 1000 is clamped to the server's bound
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            assert choice["finish_reason"] == ("length" if usage["completion_tokens"] == MAX else "stop")
            status, short = await chat(http, max_tokens=2)
            assert status == 200 and short["usage"]["completion_tokens"] <= 2 and short["model"] == "backpack-student"
            async with http.get("/health") as r:
                assert r.status == 200 and (await r.json())["version"] == 0
            async with http.get("/v1/models") as r:
                assert [m["id"] for m in (await r.json())["data"]] == [
                    "backpack-student", "backpack-student:live", "backpack-student:v0"]  # no registry: no others
            info = server.info()
            assert info["requests"] == 2 and info["failed"] == 0 and info["version"] == 0
            assert info["url"].startswith("http://127.0.0.1:")
    asyncio.run(main())


@pytest.mark.parametrize("max_batch", [1, 16])  # alone behind the lock, and through the batch engine
def test_streaming_matches_the_plain_answer(student, max_batch):
    async def main():
        async with serving(student, max_batch=max_batch) as (server, http):
            for decoding in ({"temperature": 0}, {"temperature": 0.9, "top_p": 0.95, "seed": 7}):
                status, plain = await chat(http, **decoding)
                assert status == 200
                events = await chat_stream(http, stream_options={"include_usage": True}, **decoding)
                assert events[-1] == "[DONE]"
                assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
                assert all(e["object"] == "chat.completion.chunk" and e["backpack"] == {"version": 0}
                           for e in events[:-1])
                assert len({e["id"] for e in events[:-1]}) == 1
                assert streamed_text(events) == plain["choices"][0]["message"]["content"]
                final, usage = events[-3], events[-2]
                assert final["choices"][0] == {"index": 0, "delta": {}, "finish_reason": plain["choices"][0]["finish_reason"]}
                assert usage["choices"] == [] and usage["usage"] == plain["usage"]
            assert server.info()["requests"] == 4
    asyncio.run(main())


BAD = [  # (raw body, the field the error names)
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({"model": "x"}).encode(), "messages"),
    (json.dumps({"messages": []}).encode(), "messages"),
    (json.dumps({"messages": "hello"}).encode(), "messages"),
    (json.dumps({"messages": ["hello"]}).encode(), "messages[0]"),
    (json.dumps({"messages": [{"role": "user"}]}).encode(), "messages[0].content"),
    (json.dumps({"messages": MESSAGES, "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"messages": MESSAGES, "max_tokens": "5"}).encode(), "max_tokens"),
    (json.dumps({"messages": MESSAGES, "max_completion_tokens": -1}).encode(), "max_completion_tokens"),
    (json.dumps({"messages": MESSAGES, "temperature": -1}).encode(), "temperature"),
    (json.dumps({"messages": MESSAGES, "top_p": 0}).encode(), "top_p"),
    (json.dumps({"messages": MESSAGES, "n": 2}).encode(), "n"),
    (json.dumps({"messages": MESSAGES, "stream": "yes"}).encode(), "stream"),
    (json.dumps({"messages": MESSAGES, "stop": ["\n"]}).encode(), "stop"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 300}]}).encode(), "messages"),  # > context
]


def test_bad_requests_are_400_naming_the_field(student):
    async def main():
        async with serving(student) as (server, http):
            for raw, field in BAD:
                async with http.post("/v1/chat/completions", data=raw,
                                     headers={"Content-Type": "application/json"}) as r:
                    assert r.status == 400, raw
                    err = (await r.json())["error"]
                assert err["type"] == "invalid_request_error" and err["param"] == field, (raw, err)
                assert field is None or field.split("[")[0] in err["message"]
            # too big, too deep: JSON errors too, not aiohttp's plain text or a 500
            too_big = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]})
            deep = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
            for raw, code in ((too_big, 413), (deep, 400)):
                async with http.post("/v1/chat/completions", data=raw,
                                     headers={"Content-Type": "application/json"}) as r:
                    assert r.status == code and r.content_type == "application/json"
                    assert "error" in await r.json()
            status, _ = await chat(http)  # and the server is still fine
            assert status == 200
            assert server.info()["rejected"] == len(BAD) + 2 and server.info()["failed"] == 0
    asyncio.run(main())


def test_hot_swap_while_requests_are_in_flight(student, redis_server, tmp_path):
    reg = Registry(redis_server.url, "serve", tmp_path / "run")
    assert publish(reg, student, tmp_path / "ck", shift=0.5) == 1
    expected = {}
    for version, meta in ((0, None), (1, reg.get(1))):
        ap = load_version(meta, student, merge=True)
        expected[version] = reference_text(ap.model, ap.tokenizer)
    assert expected[0] != expected[1]  # the new version really answers differently

    async def main():
        async with serving(student, reg) as (server, http):
            answers = []  # (client, sent at, status, version, text)
            load = server._load

            def slow_load(version: int):  # a real model loads for seconds; the tiny one in a blink, a race
                time.sleep(1.0)
                return load(version)

            server._load = slow_load

            async def client(n: int, stream: bool):
                while True:
                    sent = time.monotonic()
                    if stream:
                        events = await chat_stream(http)
                        status, version, text = 200, events[0]["backpack"]["version"], streamed_text(events)
                    else:
                        status, out = await chat(http)
                        version, text = out["backpack"]["version"], out["choices"][0]["message"]["content"]
                    answers.append((n, sent, status, version, text))
                    if version == 1:
                        return

            clients = [asyncio.create_task(client(n, stream=n == 2)) for n in range(3)]
            await asyncio.sleep(0.3)
            await asyncio.to_thread(reg.promote, 1, "test")
            promoted_at = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*clients), timeout=60)

            assert all(status == 200 for _, _, status, _, _ in answers)
            assert all(text == expected[version] for _, _, _, version, text in answers)
            for n in range(3):  # each client sees version 0, then version 1, never back
                versions = [v for c, _, _, v, _ in answers if c == n]
                assert versions == sorted(versions) and versions[-1] == 1
            # the old version kept answering while the new one loaded
            assert any(v == 0 and sent > promoted_at for _, sent, _, v, _ in answers)
            info = server.info()
            assert info["version"] == 1 and info["swaps"] == 1 and info["failed"] == 0
            assert info["requests"] == len(answers)
            # a direct swap back to the base (what a rollback does)
            assert await server.swap(0)
            status, out = await chat(http)
            assert out["backpack"]["version"] == 0 and out["choices"][0]["message"]["content"] == expected[0]
    asyncio.run(main())


def test_a_broken_version_keeps_the_old_one_serving(student, redis_server, tmp_path):
    reg = Registry(redis_server.url, "broken", tmp_path / "run")
    publish(reg, student, tmp_path / "ck", shift=0.5)
    publish(reg, student, tmp_path / "ck", shift=0.1)
    (Path(reg.get(2)["path"]) / checkpoints.WEIGHTS).write_bytes(b"not a safetensors file")
    reg.promote(1)  # live before the server starts: it starts on version 1

    async def main():
        async with serving(student, reg) as (server, http):
            assert server.info()["version"] == 1
            reg.promote(2)
            for _ in range(120):
                if server.info()["failed_swaps"]:
                    break
                await asyncio.sleep(0.25)
            info = server.info()
            assert info["failed_swaps"] == 1 and info["version"] == 1 and info["swap_error"].startswith("version 2:")
            status, out = await chat(http)
            assert status == 200 and out["backpack"]["version"] == 1
    asyncio.run(main())


def test_server_as_a_ray_actor(ray_session, student):
    ray = ray_session
    actor = ray.remote(StudentServer).options(num_cpus=0).remote(student, ServeConfig(port=0, max_new_tokens=4))
    try:
        url = ray.get(actor.start.remote(), timeout=180)
        req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps({"messages": MESSAGES}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            out = json.loads(r.read())
        assert out["backpack"]["version"] == 0 and out["usage"]["completion_tokens"] <= 4
        assert ray.get(actor.info.remote())["requests"] == 1
        ray.get(actor.stop.remote(), timeout=60)
    finally:
        ray.kill(actor)
