"""StudentServer: student versions behind an OpenAI-compatible HTTP endpoint, the live one hot-swapped.

Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (also streamed, as Server-Sent Events),
`GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus). By default the server follows the run's registry
event stream; on a `promoted` event it loads that version in a worker thread while the old version keeps
answering, then switches in one assignment. A request generates on the version that was current when its
generation began and finishes on it, so a swap never fails or drops one. Pinned to a version (`backpack serve
--version N`) it serves that one and follows nothing. A request's `model` picks a version: `<name>` (the default),
`<name>:live`, `<name>:v<N>` (loaded on first use; the `serve.max_versions` most recent kept).

Generation runs off the event loop, so it keeps accepting requests, health checks and swaps meanwhile:
concurrent requests are decoded together by the model's batch engine (backpack/serve/batching.py: a request
joins the running batch and leaves it as it ends), or one at a time behind a lock where the model family is not
batched or serve.max_batch is 1. Safe by default: with
`serve.api_key_env` every endpoint but /health needs `Authorization: Bearer <key>` (a bind other than loopback
needs it); at most `serve.max_queue` requests wait or generate (more get 429 with Retry-After); a request not
done within `serve.request_timeout_s` is stopped (504), and one whose client went away stops generating. A
plain class with async methods: constructed in-process (tests, `backpack serve`) or made an async Ray actor
where the continual system is assembled.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from typing import Optional

import torch
from aiohttp import web

from backpack.config import ServeConfig, StudentConfig
from backpack.core.chat import encode_chat, with_context
from backpack.errors import InputError
from backpack.mental.recall import prompt_text
from backpack.serve.batching import Job, engine_for
from backpack.serve.generation import generate_until, reachable_host, run_job, usage
from backpack.serve.metrics import CONTENT_TYPE, ServeMetrics
from backpack.serve.requests import MAX_BODY, Asked, BadRequest, error, parse_chat, parse_completion
from backpack.serve.versions import Served, VersionLoader
from backpack.student.registry import Registry

log = logging.getLogger(__name__)
POLL_S = 0.5  # how often the registry stream is read: promotions are rare, a Redis round trip is cheap


class StudentServer:
    """Serves student versions over OpenAI-compatible HTTP; follows and hot-swaps the live one, or serves the
    version it is pinned to."""

    def __init__(self, student_cfg: StudentConfig, serve_cfg: ServeConfig, registry: Optional[Registry] = None,
                 model_name: str = "backpack-student", recall=None, default_task: str = "default",
                 version: Optional[int] = None):
        self.student_cfg, self.serve_cfg, self.registry, self.model_name = student_cfg, serve_cfg, registry, model_name
        # mental.student_recall: a retrieval-augmented student (`backpack.mental.recall.Recaller`); a request
        # names its task with a "task" field (else `default_task`)
        self.recall, self.default_task = recall, default_task
        self.pinned = version  # None: follow the registry's live version
        self.url: Optional[str] = None
        self.stats = {"requests": 0, "failed": 0, "rejected": 0, "swaps": 0, "failed_swaps": 0, "cancelled": 0,
                      "timed_out": 0, "queue_full": 0, "unauthorized": 0}
        self.metrics = ServeMetrics()
        self._served: Optional[Served] = None
        self._others: OrderedDict[int, Served] = OrderedDict()  # versions asked for by name, most recent last
        self._versions = VersionLoader(student_cfg, serve_cfg, registry, model_name)
        self._swap_error: Optional[str] = None
        self._runner: Optional[web.AppRunner] = None
        self._follower: Optional[asyncio.Task] = None
        self._key: Optional[bytes] = None
        self._pending = 0
        self._gen_lock: Optional[asyncio.Lock] = None   # made in start(): they belong to the serving loop
        self._swap_lock: Optional[asyncio.Lock] = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        """Load the version to serve (pinned, else the live one: version 0, the untrained base, when none is
        promoted or there is no registry), listen on serve.host:serve.port (0: a free port), follow the
        registry unless pinned; returns the URL."""
        if self._runner is not None:
            return self.url
        name = self.serve_cfg.api_key_env
        if name:
            key = os.environ.get(name, "")
            if not key:
                raise InputError(f"serve.api_key_env names {name!r}, which is not set (or empty): export the API key "
                                 "clients must send in that variable")
            self._key = key.encode()
        torch.set_num_threads(self.serve_cfg.threads)
        self._gen_lock, self._swap_lock = asyncio.Lock(), asyncio.Lock()
        after, live = None, self.pinned
        if self.registry is not None and self.pinned is None:
            # The stream position first: a promotion landing while the live version loads is then still seen.
            after, live = await asyncio.to_thread(self._stream_position)
        self._served = await asyncio.to_thread(self._load, live or 0)
        self.metrics.version.set(self._served.version)
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._auth])
        app.add_routes([web.post("/v1/chat/completions", self._chat), web.post("/v1/completions", self._complete),
                        web.get("/v1/models", self._models), web.get("/health", self._health),
                        web.get("/metrics", self._metrics)])
        # On stop, requests in flight get a few seconds to finish before their connections are closed.
        self._runner = web.AppRunner(app, shutdown_timeout=10.0)
        await self._runner.setup()
        host, port = self.serve_cfg.host, self.serve_cfg.port
        try:
            await web.TCPSite(self._runner, host, port).start()
        except OSError as e:
            await self._runner.cleanup()
            self._runner = None
            raise InputError(f"serve.port: cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.url = f"http://{reachable_host(host)}:{self._runner.addresses[0][1]}"
        if self.registry is not None and self.pinned is None:
            self._follower = asyncio.create_task(self._follow(after))
        log.info("StudentServer: serving version %d at %s", self._served.version, self.url)
        return self.url

    async def stop(self) -> None:
        """Stop following the registry and close the HTTP server (in-flight requests may finish first)."""
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def info(self) -> dict:
        """URL, served version, requests answered / failed / rejected (4xx), swaps done / failed."""
        return {"url": self.url, "model": self.model_name,
                "version": self._served.version if self._served else None, **self.stats,
                "swap_error": self._swap_error}

    # ------------------------------------------------------------------ versions

    async def swap(self, version: int) -> bool:
        """Serve `version` (0 = the untrained base) from now on. It loads in a worker thread while requests
        keep being answered by the current version; a version that fails to load is logged and the current
        one kept. Returns whether `version` is now served."""
        async with self._swap_lock:  # one load at a time, applied in the order asked
            old = self._served.version if self._served else None
            if old == version:
                return True
            t0 = time.perf_counter()
            try:
                served = self._others.pop(version, None) or await asyncio.to_thread(self._load, version)
            except Exception as e:  # a broken or missing version must not take the server down
                self.stats["failed_swaps"] += 1
                self._swap_error = f"version {version}: {type(e).__name__}: {e}"
                log.error("StudentServer: cannot load student version %d, still serving version %s: %s",
                          version, old, self._swap_error)
                return False
            self._served = served  # one assignment: a request sees the old version or the new, never a mix
            self.metrics.version.set(version)
            self.stats["swaps"] += 1
            log.info("StudentServer: now serving version %d (was %s; loaded in %.1f s)", version, old,
                     time.perf_counter() - t0)
            return True

    def _load(self, version: int) -> Served:
        return self._versions.load(version)

    async def _pick(self, model: Optional[str]) -> Served:
        """The version a request's `model` names: `<name>:v<N>` or `<name>:live`; anything else (a client's own
        label) is the default version."""
        base, _, tag = (model or "").rpartition(":")
        if base != self.model_name:
            return self._served
        if tag == "live":
            version = self._served.version if self.pinned is None else await asyncio.to_thread(self._live)
        elif re.fullmatch(r"v\d+", tag):
            version = int(tag[1:])
        else:
            raise BadRequest("model", f"unknown model {model!r}: {self.model_name}, {self.model_name}:live or "
                                      f"{self.model_name}:v<N>", 404, "model_not_found")
        if version == self._served.version:
            return self._served
        if version in self._others:
            self._others.move_to_end(version)
            return self._others[version]
        async with self._swap_lock:
            if version not in self._others:
                try:
                    self._others[version] = await asyncio.to_thread(self._load, version)
                except (KeyError, ValueError) as e:
                    raise BadRequest("model", f"model {model!r}: {e.args[0] if e.args else e}", 404,
                                     "model_not_found") from None
                while len(self._others) >= self.serve_cfg.max_versions:  # the default one is kept besides
                    _, gone = self._others.popitem(last=False)
                    if gone.adapter is not None and gone.adapter != self._served.adapter:
                        gone.gen.model.delete_adapter(gone.adapter)
        return self._others.get(version) or self._served

    def _live(self) -> int:
        return (self.registry.live() if self.registry is not None else None) or 0

    def _stream_position(self) -> tuple[str, Optional[int]]:
        last = self.registry.client.xrevrange(self.registry.keys("events"), count=1)
        return (last[0][0] if last else "0-0"), self.registry.live()

    def _events_after(self, after: str) -> list[tuple[str, dict]]:
        events = []
        while batch := self.registry.events(after=after, count=100):
            events += batch
            after = batch[-1][0]
        return events

    async def _follow(self, after: str) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                events = await asyncio.to_thread(self._events_after, after)
                if not events:
                    continue
                after = events[-1][0]
                promoted = [f for _, f in events if f.get("type") == "promoted"]
                if promoted:  # of several promotions since the last look, only the latest matters
                    await self.swap(int(promoted[-1]["version"]))
            except Exception as e:  # Redis restarting, say: keep serving and look again
                log.warning("StudentServer: reading the registry stream failed (%s); retrying", e)

    # ------------------------------------------------------------------ HTTP

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self._key is not None and request.path != "/health":
            given = request.headers.get("Authorization", "")
            token = given[len("Bearer "):].encode() if given.startswith("Bearer ") else b""
            if not hmac.compare_digest(token, self._key):
                self.stats["unauthorized"] += 1
                self.metrics.answered(request.path, 401)
                return error(401, "a valid API key is needed: send 'Authorization: Bearer <key>'", None,
                             "authentication_error", {"WWW-Authenticate": "Bearer"})
        return await handler(request)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": self._served.version})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.text(), headers={"Content-Type": CONTENT_TYPE})

    async def _models(self, request: web.Request) -> web.Response:
        versions = await asyncio.to_thread(lambda: [m["version"] for m in self.registry.versions()]) \
            if self.registry is not None else []
        ids = [self.model_name, f"{self.model_name}:live"] + [f"{self.model_name}:v{v}" for v in [0, *versions]]
        return web.json_response({"object": "list", "data": [
            {"id": i, "object": "model", "owned_by": "backpack",
             **({"backpack": {"version": self._served.version}} if i == self.model_name else {})} for i in ids]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "chat")

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "completions")

    async def _answer(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        """One request, bounded: at most serve.max_queue at once, each within serve.request_timeout_s."""
        t0 = time.perf_counter()
        if self._pending >= self.serve_cfg.max_queue:
            self.stats["queue_full"] += 1
            self.metrics.answered(endpoint, 429)
            return error(429, f"the server is full ({self._pending} requests waiting or generating): retry later",
                         None, "rate_limit_error", {"Retry-After": "1"})
        self._pending += 1
        self.metrics.queue.set(self._pending)
        try:
            resp = await self._handle(request, endpoint, t0)
        finally:
            self._pending -= 1
            self.metrics.queue.set(self._pending)
        self.metrics.answered(endpoint, resp.status)
        self.metrics.latency.observe(time.perf_counter() - t0)
        return resp

    async def _read(self, request: web.Request, endpoint: str) -> Asked:
        try:
            body = await request.json()
        except ValueError as e:  # bad JSON or bad UTF-8
            raise BadRequest(None, f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise BadRequest(None, "the request body is nested too deeply to be a request") from None
        except web.HTTPRequestEntityTooLarge:  # aiohttp's own answer is plain text: every error here is JSON
            raise BadRequest(None, f"the request body is over the server's limit of {MAX_BODY} bytes", 413) from None
        limit = self.serve_cfg.max_new_tokens
        return parse_chat(body, limit, self.default_task) if endpoint == "chat" else parse_completion(body, limit)

    async def _handle(self, request: web.Request, endpoint: str, t0: float) -> web.StreamResponse:
        try:
            asked = await self._read(request, endpoint)
            served = await self._pick(asked.model)
        except BadRequest as e:
            self.stats["rejected"] += 1
            return error(e.status, e.message, e.param, e.kind)
        recalled, messages = None, asked.messages
        if self.recall is not None and messages is not None:
            got = await asyncio.to_thread(self.recall.recall, asked.task, prompt_text(messages))
            if got is not None:
                recalled = {"ids": got[0].ids, "knowledge_version": got[1]}
                messages = with_context(messages, got[0].context)
        deadline = t0 + self.serve_cfg.request_timeout_s
        tok, chat = served.gen.tokenizer, messages is not None
        try:  # off the event loop: a long prompt takes a while to encode
            ids = await asyncio.to_thread(lambda: encode_chat(tok, messages) if chat else tok(asked.prompt).input_ids)
        except Exception as e:  # the chat template refused the conversation (a role it does not know)
            self.stats["rejected"] += 1
            return error(400, f"the chat template rejected 'messages': {e}", "messages")
        decoding, field = asked.decoding, "messages" if chat else "prompt"
        if len(ids) + decoding.max_new_tokens > served.gen.context:
            self.stats["rejected"] += 1
            return error(400, f"'{field}' is {len(ids)} tokens; with max_tokens {decoding.max_new_tokens} "
                              f"that exceeds the model context of {served.gen.context} tokens", field)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": asked.model or self.model_name,
                "backpack": {"version": served.version, **({"recalled": recalled} if recalled else {})}}
        engine = engine_for(served.gen, self.serve_cfg.max_batch)
        if engine is None:  # one request at a time: wait for the model
            try:
                await asyncio.wait_for(self._gen_lock.acquire(), max(0.0, deadline - time.perf_counter()))
            except asyncio.TimeoutError:
                self.stats["timed_out"] += 1
                return error(503, "no generation slot within the request's deadline of "
                                  f"{self.serve_cfg.request_timeout_s} s: retry later", None, "server_error",
                             {"Retry-After": "1"})
        try:
            if engine is None:
                served.activate()
            job = Job(ids, decoding, adapter=served.adapter)

            def produce(tokens_out=None):  # the generation, batched or alone; returns when it has finished
                if engine is not None:
                    return run_job(request, engine, job, deadline, tokens_out)
                return self._alone(request, served, job, deadline, tokens_out)
            if asked.stream:
                return await self._stream(request, tok, produce, job, asked, head, t0)
            try:
                ended = await produce()
            except Exception as e:
                self.stats["failed"] += 1
                log.exception("StudentServer: generation failed")
                return error(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error")
        finally:
            if engine is None:
                self._gen_lock.release()
        tokens, finish = job.tokens, job.finish
        self.metrics.generated(len(tokens), time.perf_counter() - t0)
        if ended == "timed_out":
            self.stats["timed_out"] += 1
            return error(504, f"the request's deadline of {self.serve_cfg.request_timeout_s} s passed while it was "
                              "generating: ask for fewer tokens", None, "timeout")
        if ended == "gone":
            self.stats["cancelled"] += 1
            return error(499, "the client went away", None, "cancelled")  # nobody reads it
        self.stats["requests"] += 1
        text = tok.decode(tokens, skip_special_tokens=True)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else \
            {"index": 0, "text": text, "logprobs": None}
        return web.json_response({**head, "object": "chat.completion" if chat else "text_completion",
                                  "choices": [{**choice, "finish_reason": finish}], "usage": usage(ids, tokens)})

    async def _alone(self, request, served: Served, job: Job, deadline: float, tokens_out=None):
        job.tokens, job.finish, ended = await generate_until(request, served.gen, job.ids, job.decoding, deadline,
                                                             tokens_out)
        return ended

    async def _stream(self, request, tok, produce, job: Job, asked: Asked, head, t0: float) -> web.StreamResponse:
        """Server-Sent Events of the new text as tokens come (a token that ends inside a character waits for
        the next), then the finish reason, the usage when asked, and [DONE]."""
        tokens_out: asyncio.Queue = asyncio.Queue()
        runner = asyncio.ensure_future(produce(tokens_out))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        chat = asked.messages is not None
        kind = "chat.completion.chunk" if chat else "text_completion"

        async def send(data) -> None:
            await resp.write(f"data: {json.dumps(data)}\n\n".encode())

        def chunk(text: Optional[str], finish=None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return {**head, "object": kind, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return {**head, "object": kind, "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                                         "finish_reason": finish}]}
        seen, sent = [], ""
        try:
            await resp.prepare(request)
            if chat:
                await send(chunk(None, role=True))
            while (token := await tokens_out.get()) is not None:
                seen.append(token)
                text = tok.decode(seen, skip_special_tokens=True)
                if text.endswith("\ufffd") or len(text) <= len(sent):
                    continue
                if not sent:
                    self.metrics.first_token.observe(time.perf_counter() - t0)
                await send(chunk(text[len(sent):]))
                sent = text
            ended = await runner
            if ended == "timed_out":  # the status line has gone: say so in the stream
                self.stats["timed_out"] += 1
                await send({"error": {"message": f"the request's deadline of {self.serve_cfg.request_timeout_s} s "
                                                 "passed while it was generating", "type": "timeout",
                                      "param": None, "code": None}})
            else:
                await send(chunk(None, job.finish))
                self.stats["requests"] += 1
            if asked.include_usage:
                await send({**head, "object": kind, "choices": [], "usage": usage(job.ids, job.tokens)})
            await resp.write(b"data: [DONE]\n\n")
            self.metrics.generated(len(job.tokens), time.perf_counter() - t0)
        except ConnectionError:  # the client went away: nobody to tell
            self.stats["cancelled"] += 1
        except Exception as e:
            self.stats["failed"] += 1
            log.exception("StudentServer: streamed generation failed")
            with contextlib.suppress(Exception):  # the status line has gone: report in the stream
                await send({"error": {"message": f"generation failed: {type(e).__name__}: {e}",
                                      "type": "server_error", "param": None, "code": None}})
        finally:
            job.cancel.set()
            with contextlib.suppress(Exception):
                await runner  # the model is free again before this request lets go of it
        return resp
