"""StudentServer: the live student version behind an OpenAI-compatible HTTP endpoint, hot-swapped.

Endpoints: `POST /v1/chat/completions` (also streamed, as Server-Sent Events), `GET /v1/models`, `GET /health`.
The server follows the run's registry event stream; on a `promoted` event it loads that version in a worker
thread while the old version keeps answering, then switches in one assignment. A request generates on the
version that was current when its generation began and finishes on it, so a swap never fails or drops one.

Generation runs in a worker thread, one request at a time (a CPU model has no spare cores for a second one),
so the event loop keeps accepting requests, health checks and swaps meanwhile. A plain class with async
methods: constructed in-process (tests) or made an async Ray actor where the system is assembled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Optional

import torch
from aiohttp import web

from backpack.config import ServeConfig, StudentConfig
from backpack.core.chat import encode_chat, with_context
from backpack.core.types import LENGTH, STOP, DecodingParams
from backpack.errors import InputError
from backpack.mental.recall import prompt_text
from backpack.student.registry import Registry, load_version
from backpack.teachers.hf import HFTeacher

log = logging.getLogger(__name__)
POLL_S = 0.5  # how often the registry stream is read: promotions are rare, a Redis round trip is cheap


@dataclass(frozen=True)
class _Served:
    version: int
    gen: HFTeacher  # the version's model and tokenizer, with its stop tokens and context length


class _BadRequest(Exception):
    def __init__(self, param: Optional[str], message: str):
        super().__init__(message)
        self.param, self.message = param, message


class _Cancelled:
    """A stopping criterion (duck-typed, so this module need not import transformers) that ends a generation
    whose client has gone away, so the next request does not wait for tokens nobody reads."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _generate(gen: HFTeacher, ids: list[int], p: DecodingParams, streamer=None, cancel=None) -> tuple[list[int], str]:
    """One answer from `gen`'s model: its new token ids (the stop token cut off) and finish reason."""
    kwargs = dict(max_new_tokens=p.max_new_tokens, pad_token_id=gen.tokenizer.pad_token_id, streamer=streamer,
                  stopping_criteria=[_Cancelled(cancel or threading.Event())])
    if p.greedy:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    else:
        kwargs.update(do_sample=True, temperature=p.temperature, top_k=None, top_p=p.top_p)
        if p.seed is not None:
            torch.manual_seed(p.seed)  # safe: generations run one at a time
    input_ids = torch.tensor([ids], device=gen.device)
    with torch.inference_mode():
        out = gen.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    tokens = out[0, len(ids):].tolist()
    stop = next((j for j, t in enumerate(tokens) if t in gen.stop_ids), None)
    return (tokens, LENGTH) if stop is None else (tokens[:stop], STOP)


def _field(body: dict, name: str, kind, ok, rule: str, default=None):
    """body[name] checked: absent or null gives `default`; a wrong type or value is a 400 naming the field."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind) or not ok(value):
        raise _BadRequest(name, f"'{name}' must be {rule} (got {value!r})")
    return value


MAX_BODY = 1 << 20  # bytes of one request body (aiohttp's default, named so the 413 can say it)


def _error(status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error"):
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": None}},
                             status=status)


class StudentServer:
    """Serves the registry's live student version over OpenAI-compatible HTTP and hot-swaps promoted ones."""

    def __init__(self, student_cfg: StudentConfig, serve_cfg: ServeConfig, registry: Optional[Registry] = None,
                 model_name: str = "backpack-student", recall=None, default_task: str = "default"):
        self.student_cfg, self.serve_cfg, self.registry, self.model_name = student_cfg, serve_cfg, registry, model_name
        # mental.student_recall: a retrieval-augmented student (`backpack.mental.recall.Recaller`); a request
        # names its task with a "task" field (else `default_task`)
        self.recall, self.default_task = recall, default_task
        self.url: Optional[str] = None
        self.stats = {"requests": 0, "failed": 0, "rejected": 0, "swaps": 0, "failed_swaps": 0}
        self._served: Optional[_Served] = None
        self._swap_error: Optional[str] = None
        self._runner: Optional[web.AppRunner] = None
        self._follower: Optional[asyncio.Task] = None
        self._gen_lock: Optional[asyncio.Lock] = None   # made in start(): they belong to the serving loop
        self._swap_lock: Optional[asyncio.Lock] = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        """Load the live version (version 0, the untrained base, when none is promoted or there is no
        registry), listen on serve.host:serve.port (0: a free port), follow the registry; returns the URL."""
        if self._runner is not None:
            return self.url
        torch.set_num_threads(self.serve_cfg.threads)
        self._gen_lock, self._swap_lock = asyncio.Lock(), asyncio.Lock()
        after, live = None, None
        if self.registry is not None:
            # The stream position first: a promotion landing while the live version loads is then still seen.
            after, live = await asyncio.to_thread(self._stream_position)
        self._served = await asyncio.to_thread(self._load, live or 0)
        app = web.Application(client_max_size=MAX_BODY)
        app.add_routes([web.post("/v1/chat/completions", self._chat), web.get("/v1/models", self._models),
                        web.get("/health", self._health)])
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
        self.url = f"http://{_reachable_host(host)}:{self._runner.addresses[0][1]}"
        if self.registry is not None:
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
        """URL, served version, requests answered / failed / rejected (400), swaps done / failed."""
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
                served = await asyncio.to_thread(self._load, version)
            except Exception as e:  # a broken or missing version must not take the server down
                self.stats["failed_swaps"] += 1
                self._swap_error = f"version {version}: {type(e).__name__}: {e}"
                log.error("StudentServer: cannot load student version %d, still serving version %s: %s",
                          version, old, self._swap_error)
                return False
            self._served = served  # one assignment: a request sees the old version or the new, never a mix
            self.stats["swaps"] += 1
            log.info("StudentServer: now serving version %d (was %s; loaded in %.1f s)", version, old,
                     time.perf_counter() - t0)
            return True

    def _load(self, version: int) -> _Served:
        if version != 0 and self.registry is None:
            raise ValueError(f"cannot serve student version {version}: the server has no registry")
        meta = self.registry.get(version) if version else None
        ap = load_version(meta, self.student_cfg, merge=self.serve_cfg.merge)
        name = f"{self.model_name}-v{version}"
        return _Served(version, HFTeacher.from_model(name, ap.model, ap.tokenizer, fingerprint=name))

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

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": self._served.version})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "owned_by": "backpack",
             "backpack": {"version": self._served.version}}]})

    def _parse(self, body) -> tuple[list[dict], DecodingParams, dict]:
        if not isinstance(body, dict):
            raise _BadRequest(None, "the request body must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("messages", "'messages' must be a non-empty list of {role, content} objects")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _BadRequest(f"messages[{i}]", f"messages[{i}] must be an object with a string 'role'")
            content = m.get("content")
            if isinstance(content, list) and all(isinstance(c, dict) and c.get("type") == "text"
                                                 and isinstance(c.get("text"), str) for c in content):
                content = "".join(c["text"] for c in content)  # OpenAI content parts: text only
            if not isinstance(content, str):
                raise _BadRequest(f"messages[{i}].content", f"messages[{i}].content must be a string")
            clean.append({"role": m["role"], "content": content})
        limit = self.serve_cfg.max_new_tokens
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _field(body, name, int, lambda v: v >= 1, "an integer >= 1", limit)
        _field(body, "n", int, lambda v: v == 1, "1 (one choice per request)")
        if body.get("stop"):
            raise _BadRequest("stop", "'stop' sequences are not supported by this server")
        _field(body, "stream_options", dict, lambda v: True, "an object")
        decoding = DecodingParams(
            max_new_tokens=min(max_tokens, limit),  # the server's bound wins, as documented
            temperature=float(_field(body, "temperature", (int, float), lambda v: 0 <= v <= 2,
                                     "a number from 0 to 2", 0.0)),
            top_p=float(_field(body, "top_p", (int, float), lambda v: 0 < v <= 1, "a number in (0, 1]", 1.0)),
            seed=_field(body, "seed", int, lambda v: True, "an integer"))
        stream = _field(body, "stream", bool, lambda v: True, "true or false", False)
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        model = body.get("model") if isinstance(body.get("model"), str) else self.model_name
        task = _field(body, "task", str, lambda v: bool(v), "a task name", self.default_task)
        return clean, decoding, {"stream": stream, "include_usage": usage, "model": model, "task": task}

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            try:
                body = await request.json()
            except ValueError as e:  # bad JSON or bad UTF-8
                raise _BadRequest(None, f"the request body is not valid JSON: {e}") from None
            except RecursionError:
                raise _BadRequest(None, "the request body is nested too deeply to be a chat request") from None
            messages, decoding, opts = self._parse(body)
        except _BadRequest as e:
            self.stats["rejected"] += 1
            return _error(400, e.message, e.param)
        except web.HTTPRequestEntityTooLarge:  # aiohttp's own answer is plain text: every error here is JSON
            self.stats["rejected"] += 1
            return _error(413, f"the request body is over the server's limit of {MAX_BODY} bytes")
        recalled = None
        if self.recall is not None:
            got = await asyncio.to_thread(self.recall.recall, opts["task"], prompt_text(messages))
            if got is not None:
                recalled = {"ids": got[0].ids, "knowledge_version": got[1]}
                messages = with_context(messages, got[0].context)
        async with self._gen_lock:
            served = self._served  # this request finishes on this version, whatever is swapped in meanwhile
            try:
                ids = encode_chat(served.gen.tokenizer, messages)
            except Exception as e:  # the chat template refused the conversation (a role it does not know)
                self.stats["rejected"] += 1
                return _error(400, f"the chat template rejected 'messages': {e}", "messages")
            if len(ids) + decoding.max_new_tokens > served.gen.context:
                self.stats["rejected"] += 1
                return _error(400, f"'messages' are {len(ids)} tokens; with max_tokens {decoding.max_new_tokens} "
                                   f"they exceed the model context of {served.gen.context} tokens", "messages")
            head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": opts["model"],
                    "backpack": {"version": served.version, **({"recalled": recalled} if recalled else {})}}
            if opts["stream"]:
                return await self._stream(request, served, ids, decoding, head, opts["include_usage"])
            try:
                tokens, finish = await asyncio.to_thread(_generate, served.gen, ids, decoding)
            except Exception as e:
                self.stats["failed"] += 1
                log.exception("StudentServer: generation failed")
                return _error(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error")
        self.stats["requests"] += 1
        text = served.gen.tokenizer.decode(tokens, skip_special_tokens=True)
        return web.json_response({**head, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": _usage(ids, tokens)})

    async def _stream(self, request, served: _Served, ids, decoding, head, include_usage) -> web.StreamResponse:
        from transformers import AsyncTextIteratorStreamer

        streamer = AsyncTextIteratorStreamer(served.gen.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        job = asyncio.ensure_future(asyncio.to_thread(_generate, served.gen, ids, decoding, streamer, cancel))
        # A generation that raises never ends its streamer: end it here so the reading loop below stops.
        job.add_done_callback(lambda _: streamer.end())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

        async def send(data) -> None:
            await resp.write(f"data: {json.dumps(data)}\n\n".encode())

        def chunk(delta: dict, finish=None) -> dict:
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        try:
            await resp.prepare(request)
            await send(chunk({"role": "assistant", "content": ""}))
            async for text in streamer:
                if text:
                    await send(chunk({"content": text}))
            tokens, finish = await job
            await send(chunk({}, finish))
            if include_usage:
                await send({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(ids, tokens)})
            await resp.write(b"data: [DONE]\n\n")
            self.stats["requests"] += 1
        except ConnectionError:  # the client went away: nobody to tell
            self.stats["failed"] += 1
        except Exception as e:
            self.stats["failed"] += 1
            log.exception("StudentServer: streamed generation failed")
            with contextlib.suppress(Exception):  # the status line has gone: report in the stream
                await send({"error": {"message": f"generation failed: {type(e).__name__}: {e}",
                                      "type": "server_error", "param": None, "code": None}})
        finally:
            cancel.set()
            await asyncio.wait([job])  # the model is free again before the next request takes the lock
        return resp


def _usage(ids: list[int], tokens: list[int]) -> dict:
    return {"prompt_tokens": len(ids), "completion_tokens": len(tokens), "total_tokens": len(ids) + len(tokens)}


def _reachable_host(host: str) -> str:
    """The host for the URL clients use: a wildcard address names this node's IP instead."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    try:
        import ray  # on a cluster the node IP Ray uses is the one other nodes reach

        return ray.util.get_node_ip_address()
    except Exception:
        return "127.0.0.1"
