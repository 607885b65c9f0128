"""`backpack serve`'s server through the official `openai` client: chat and completions, streamed and not, a
version chosen by `model`, the API key, the bounded queue and its deadline, a client that leaves, a corpus of
malformed requests (all 4xx), and /metrics read by prometheus_client's parser."""

import asyncio
import contextlib
import json
import math

import aiohttp
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from backpack.config import ServeConfig
from backpack.errors import InputError
from backpack.serve.server import StudentServer
from backpack.student.registry import Registry

from test_server import MESSAGES, publish

KEY_ENV = "BACKPACK_TEST_SERVE_KEY"


@pytest.fixture
def student(tiny_model_dir):
    from backpack.config import StudentConfig

    return StudentConfig(base=tiny_model_dir, lora_r=4)


@contextlib.asynccontextmanager
async def served(student_cfg, registry=None, version=None, **serve):
    threads = torch.get_num_threads()
    server = StudentServer(student_cfg, ServeConfig(port=0, max_new_tokens=8, **serve), registry, model_name="run",
                           version=version)
    url = await server.start()
    try:
        yield server, url
    finally:
        await server.stop()
        torch.set_num_threads(threads)


def client(url, key="none"):
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_the_openai_client_chats_completes_streams_and_picks_a_version(student, redis_server, tmp_path):
    reg = Registry(redis_server.url, "run", tmp_path / "run")
    assert publish(reg, student, tmp_path / "ck", shift=0.5) == 1

    async def main():
        async with served(student, reg, version=0) as (server, url):
            api = client(url)
            chat = await api.chat.completions.create(model="run", messages=MESSAGES, temperature=0)
            text = chat.choices[0].message.content
            assert chat.object == "chat.completion" and chat.usage.completion_tokens >= 1 and text
            parts = [c.choices[0].delta.content or "" async for c in await api.chat.completions.create(
                model="run", messages=MESSAGES, temperature=0, stream=True) if c.choices]
            assert "".join(parts) == text
            done = await api.completions.create(model="run", prompt="The weather on Mars is", max_tokens=6,
                                                temperature=0)
            assert done.object == "text_completion" and done.choices[0].text and done.usage.completion_tokens <= 6
            pieces = [c.choices[0].text async for c in await api.completions.create(
                model="run", prompt="The weather on Mars is", max_tokens=6, temperature=0, stream=True)]
            assert "".join(pieces) == done.choices[0].text
            # the pinned version by default; another by name, loaded on first use
            v1 = await api.chat.completions.create(model="run:v1", messages=MESSAGES, temperature=0)
            assert v1.model_extra["backpack"]["version"] == 1 and chat.model_extra["backpack"]["version"] == 0
            assert v1.choices[0].message.content != text  # the shifted weights answer otherwise
            reg.promote(1)
            live = await api.chat.completions.create(model="run:live", messages=MESSAGES, temperature=0)
            assert live.model_extra["backpack"]["version"] == 1
            with pytest.raises(openai.NotFoundError, match="no student version 7"):
                await api.chat.completions.create(model="run:v7", messages=MESSAGES)
            with pytest.raises(openai.NotFoundError, match="unknown model 'run:best'"):
                await api.chat.completions.create(model="run:best", messages=MESSAGES)
            ids = [m.id async for m in api.models.list()]
            assert ids == ["run", "run:live", "run:v0", "run:v1"]
            assert server.info()["version"] == 0  # pinned: the promotion moved `live`, not the default
    asyncio.run(main())


def test_the_api_key_is_required_off_loopback_and_checked(student, monkeypatch):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="set serve.api_key_env"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", api_key_env=KEY_ENV).api_key_env == KEY_ENV
    assert ServeConfig(host="::1").host == "::1"

    async def missing():
        async with served(student, api_key_env=KEY_ENV):
            pass
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(InputError, match=f"serve.api_key_env names '{KEY_ENV}', which is not set"):
        asyncio.run(missing())
    monkeypatch.setenv(KEY_ENV, "s3cret-key")

    async def main():
        async with served(student, api_key_env=KEY_ENV) as (server, url):
            with pytest.raises(openai.AuthenticationError):
                await client(url).chat.completions.create(model="run", messages=MESSAGES)
            with pytest.raises(openai.AuthenticationError):
                await client(url, "wrong").models.list()
            ok = await client(url, "s3cret-key").chat.completions.create(model="run", messages=MESSAGES)
            assert ok.choices[0].message.content is not None
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{url}/health") as r:  # health checks need no key
                    assert r.status == 200
                async with http.get(f"{url}/metrics") as r:
                    assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
                    assert "s3cret" not in await r.text()
            assert server.info()["unauthorized"] == 3
    asyncio.run(main())


def test_a_full_queue_is_429_a_queued_request_past_its_deadline_503_and_a_client_that_left_is_dropped(student):
    async def main():
        async with served(student, max_queue=1, request_timeout_s=1.0, max_batch=1) as (server, url):
            await server._gen_lock.acquire()  # a generation holds the model: requests queue behind it
            api = client(url)
            waiting = asyncio.ensure_future(api.chat.completions.create(model="run", messages=MESSAGES))
            while server._pending < 1:
                await asyncio.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as full:
                await api.chat.completions.create(model="run", messages=MESSAGES)
            assert full.value.response.headers["Retry-After"] == "1"
            with pytest.raises(openai.InternalServerError) as late:  # 503: no slot within 1 s
                await waiting
            assert late.value.status_code == 503 and "deadline" in str(late.value)
            # a client that gives up while queued: its request is dropped before it generates
            async with aiohttp.ClientSession() as http:
                with contextlib.suppress(asyncio.TimeoutError):
                    await http.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES},
                                    timeout=aiohttp.ClientTimeout(total=0.3))
            server._gen_lock.release()
            while server._pending:
                await asyncio.sleep(0.05)
            info = server.info()
            assert (info["queue_full"], info["timed_out"], info["cancelled"], info["requests"]) == (1, 1, 1, 0)
            ok = await api.chat.completions.create(model="run", messages=MESSAGES)  # and it serves on
            assert ok.choices[0].finish_reason in ("stop", "length")
    asyncio.run(main())


MALFORMED = [  # (path, raw body, status, the field named)
    ("/v1/chat/completions", '{"messages": %s, "temperature": NaN}', 400, "temperature"),
    ("/v1/chat/completions", '{"messages": %s, "temperature": 1e-300}', 400, "temperature"),
    ("/v1/chat/completions", '{"messages": %s, "temperature": Infinity}', 400, "temperature"),
    ("/v1/chat/completions", '{"messages": %s, "top_p": NaN}', 400, "top_p"),
    ("/v1/chat/completions", '{"messages": %s, "seed": 1180591620717411303424}', 400, "seed"),
    ("/v1/chat/completions", '{"messages": %s, "seed": -1}', 400, "seed"),
    ("/v1/chat/completions", '{"messages": %s, "seed": 1.5}', 400, "seed"),
    ("/v1/chat/completions", '{"messages": %s, "model": 5}', 400, "model"),
    ("/v1/chat/completions", '{"messages": %s, "max_tokens": true}', 400, "max_tokens"),
    ("/v1/chat/completions", '{"messages": %s, "logprobs": true}', 400, "logprobs"),
    ("/v1/chat/completions", '{"messages": %s, "stream_options": 3}', 400, "stream_options"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": 7}]}', 400, "messages[0].content"),
    ("/v1/chat/completions", '{"messages": %s, "model": "run:v999"}', 404, "model"),
    ("/v1/completions", '{"prompt": 3}', 400, "prompt"),
    ("/v1/completions", '{"prompt": ["a", "b"]}', 400, "prompt"),
    ("/v1/completions", '{"prompt": ""}', 400, "prompt"),
    ("/v1/completions", '{"prompt": "Hi", "echo": true}', 400, "echo"),
    ("/v1/completions", '{"prompt": "Hi", "suffix": "x"}', 400, "suffix"),
    ("/v1/completions", '{"prompt": "Hi", "max_tokens": -3}', 400, "max_tokens"),
    ("/v1/completions", '{"prompt": "%s"}' % ("word " * 400), 400, "prompt"),
    ("/v1/completions", '{"prompt": ' + "[" * 50_000 + "]" * 50_000 + "}", 400, None),
    ("/v1/completions", '{"prompt": "' + "x" * (2 << 20) + '"}', 413, None),
    ("/v1/completions", "\xff\xfe", 400, None),
]


def test_malformed_requests_are_4xx_naming_the_field_and_metrics_parse(student):
    async def main():
        async with served(student) as (server, url):
            async with aiohttp.ClientSession() as http:
                for path, raw, status, param in MALFORMED:
                    body = (raw % json.dumps(MESSAGES) if "%s" in raw else raw).encode("utf-8", "surrogateescape")
                    async with http.post(url + path, data=body, headers={"Content-Type": "application/json"}) as r:
                        assert r.status == status, (raw[:80], await r.text())
                        err = (await r.json())["error"]
                    assert err["param"] == param, (raw[:80], err)
                assert (await client(url).completions.create(model="run", prompt="Hi", max_tokens=3)).choices
                async with http.get(f"{url}/metrics") as r:
                    assert r.status == 200
                    families = {f.name: f for f in text_string_to_metric_families(await r.text())}
            counts = {(s.labels["endpoint"], s.labels["code"]): s.value
                      for s in families["backpack_serve_requests"].samples if s.name.endswith("_total")}
            assert counts[("completions", "200")] == 1 and counts[("completions", "413")] == 1
            assert counts[("chat", "400")] == 12 and counts[("chat", "404")] == 1
            assert families["backpack_serve_queue_depth"].samples[0].value == 0
            assert families["backpack_serve_live_version"].samples[0].value == 0
            tokens = next(s.value for s in families["backpack_serve_generated_tokens"].samples
                          if s.name.endswith("_total"))
            assert 1 <= tokens <= 3 and not math.isnan(families["backpack_serve_tokens_per_second"].samples[0].value)
            assert server.info()["failed"] == 0 and server.info()["rejected"] == len(MALFORMED)
    asyncio.run(main())


def test_backpack_serve_on_a_finished_run_as_a_user_runs_it(tiny_model_dir, tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, _free_port, run_main

    port = _free_port()
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({
        "name": "served", "storage": {"path": str(tmp_path / "runs")}, "teachers": [{"name": "t"}],
        "prompts": {"path": str(REPO / "examples" / "prompts.jsonl")},
        "student": {"base": tiny_model_dir, "mode": "full"}, "serve": {"port": port, "max_new_tokens": 8}}))
    out = run_main(capsys, "serve", str(config), "--version", "3")
    assert out.returncode == 2 and "has no student version 3 (it has none)" in out.stderr
    out = run_main(capsys, "serve", str(config), "--version", "best")
    assert out.returncode == 2 and "a version number (0: the untrained base) or 'live'" in out.stderr
    proc = subprocess.Popen([sys.executable, "-m", "backpack.cli", "serve", str(config)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        url, t0 = f"http://127.0.0.1:{port}", time.time()
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        while True:
            try:
                answer = api.chat.completions.create(model="served", messages=MESSAGES, max_tokens=4)
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.time() - t0 < 120, proc.stdout.read()
                time.sleep(0.5)
        assert answer.model_extra["backpack"]["version"] == 0 and answer.usage.completion_tokens <= 4
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130 and "Traceback" not in output
    assert f"serving version 0 (the untrained base: the run has no version yet) of run 'served' at {url}/v1" in output


def test_several_adapters_share_one_base_and_answer_as_their_merged_versions(student, redis_server, tmp_path):
    reg = Registry(redis_server.url, "run", tmp_path / "run")
    assert [publish(reg, student, tmp_path / f"ck{i}", shift=s) for i, s in ((1, 0.5), (2, 0.02))] == [1, 2]

    async def answers(**serve):
        async with served(student, reg, version=1, max_versions=4, **serve) as (server, url):
            api = client(url)
            out = {}
            for model in ("run:v2", "run", "run:v2", "run:v0"):  # back and forth between the adapters
                r = await api.chat.completions.create(model=model, messages=MESSAGES, temperature=0)
                out.setdefault(model, []).append(r.choices[0].message.content)
            return out, server._versions._bases

    merged, no_bases = asyncio.run(answers())
    shared, bases = asyncio.run(answers(merge=False))
    assert not no_bases and len(bases) == 1  # one base in memory holding both versions as adapters
    (host,) = bases.values()
    assert {"v1", "v2"} <= set(host.model.peft_config)
    assert shared == merged and merged["run:v2"][0] == merged["run:v2"][1] != merged["run"][0]


def test_concurrent_requests_are_decoded_together_and_answer_as_alone(student):
    prompts = ["Tell me about Mars.", "Hi", "Write a long poem about the sea, the wind and the stars.", "2+2?",
               "Name three colours.", "What is a cat?"]

    async def answers(**serve):
        async with served(student, **serve) as (server, url):
            api = client(url)

            async def ask(i, p):
                if i % 2:
                    return (await api.completions.create(model="run", prompt=p, max_tokens=8, temperature=0)) \
                        .choices[0].text
                r = await api.chat.completions.create(model="run", messages=[{"role": "user", "content": p}],
                                                      temperature=0, seed=i)
                return r.choices[0].message.content
            got = await asyncio.gather(*(ask(i, p) for i, p in enumerate(prompts)))
            return got, getattr(server._served.gen, "batch_engine", None)

    alone, none = asyncio.run(answers(max_batch=1))
    together, engine = asyncio.run(answers(max_batch=16))
    assert none is None and engine.widest > 1 and together == alone
