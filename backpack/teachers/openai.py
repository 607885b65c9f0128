"""The `openai` teacher: any OpenAI-compatible chat-completions endpoint (a hosted API, `vllm serve`, Backpack's
own StudentServer) behind the teacher protocol.

Each Query is one HTTP request (the recalled context in front of the messages, as for every backend), sent by
at most `endpoint.concurrency` threads and admitted by the endpoint's requests- and tokens-per-minute limits.
429s, 5xx answers, timeouts and refused connections are retried with exponential backoff and jitter (at least
the server's Retry-After). What the endpoint says about one Query (a 400: the prompt is too long, a bad
parameter) makes that Query's row failed with the server's words; what it says about the teacher itself (401 or
403, an unknown model, or every Query of the batch failing to get through) raises TeacherError, so the
scheduler sends the batch to another teacher and nothing is lost.

The endpoint's tokenizer is unknown here: rows carry the answer's text (and the chosen tokens' logprobs when
the server returns them), not token ids, so students learn from them at the sequence level. Scoring a completion
(on-policy distillation) needs token ids on both sides, which only a vLLM server gives (`endpoint.scoring:
vllm`: its /tokenize and the prompt logprobs of /v1/completions with echo); other endpoints refuse to score.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from backpack.config import TeacherConfig
from backpack.core.chat import with_context
from backpack.core.types import LENGTH, STOP, Completion, Query
from backpack.errors import TeacherError
from backpack.runtime.redis_server import redact
from backpack.teachers.base import TeacherBase
from backpack.teachers.ratelimit import RateLimiter, backoff_s

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}   # worth another try: overload, rate limits, server hiccups
TEACHER_STATUS = {401, 403, 404}                      # about the teacher, not the Query: another teacher answers


class EndpointError(Exception):
    """One Query's request failed. `retry`: worth trying again; `fatal`: the teacher itself is unusable."""

    def __init__(self, message: str, retry: bool = False, fatal: bool = False, retry_after: Optional[float] = None):
        super().__init__(message)
        self.retry, self.fatal, self.retry_after = retry, fatal, retry_after


def request_body(q: Query, model: str) -> dict:
    """The chat-completions request for a Query (pure). top_k and repetition_penalty have no OpenAI field and
    are sent only when set, as vLLM's server reads them."""
    d = q.decoding
    body = {"model": model, "messages": with_context(q.messages, q.context), "max_tokens": d.max_new_tokens,
            "temperature": d.temperature, "top_p": d.top_p}
    if d.n != 1:
        body["n"] = d.n
    if d.seed is not None:
        body["seed"] = d.seed
    if d.logprobs:
        body.update(logprobs=True, top_logprobs=d.logprobs)
    if d.top_k:
        body["top_k"] = d.top_k
    if d.repetition_penalty != 1.0:
        body["repetition_penalty"] = d.repetition_penalty
    return body


def parse_response(q: Query, payload, teacher: str, replica: str, fingerprint: str) -> list[Completion]:
    """An endpoint's JSON answer -> one Completion per choice (pure). EndpointError if it is not a chat
    completion (garbage from a proxy, an HTML error page that came with 200)."""
    try:
        choices = sorted(payload["choices"], key=lambda c: c.get("index", 0))
        usage = payload.get("usage") or {}
        out = []
        for i, choice in enumerate(choices):
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"choice {i} has no text content")
            lps = ((choice.get("logprobs") or {}).get("content")) or []
            out.append(Completion(
                query_id=q.id, teacher=teacher, text=text, replica=replica, model_fingerprint=fingerprint,
                finish_reason=LENGTH if choice.get("finish_reason") == "length" else STOP, sample_index=i,
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0) // max(1, len(choices)),
                token_logprobs=[float(t["logprob"]) for t in lps]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise EndpointError(f"the endpoint's answer is not a chat completion ({type(e).__name__}: {e}): "
                            f"{json.dumps(payload)[:200] if not isinstance(payload, str) else payload[:200]}")
    if not out:
        raise EndpointError("the endpoint's answer has no choices")
    return out


def score_body(prompt_ids: list[int], q: Query, model: str) -> dict:
    """The completions request that has a vLLM server score q.score_ids after the prompt's tokens (pure): echo
    with no new tokens, so the answer holds the prompt logprobs of every position."""
    return {"model": model, "prompt": list(prompt_ids) + list(q.score_ids), "max_tokens": 0, "echo": True,
            "logprobs": q.decoding.logprobs, "temperature": 0.0}


def parse_scores(q: Query, payload, prompt_len: int, teacher: str, replica: str, fingerprint: str) -> Completion:
    """A vLLM completions answer with prompt logprobs -> the Completion scoring q.score_ids (pure): each position
    holds {token id: {logprob, rank}} for the top k and the token itself. EndpointError if it holds no such
    thing (a server that is not vLLM)."""
    tokens, k = list(q.score_ids), q.decoding.logprobs
    try:
        positions = payload["choices"][0]["prompt_logprobs"][prompt_len:]
        if len(positions) != len(tokens):
            raise ValueError(f"{len(positions)} positions scored for {len(tokens)} tokens")
        chosen, top_ids, top_lps = [], [], []
        for tok, pos in zip(tokens, positions):
            entries = sorted(((int(tid), e) for tid, e in pos.items()), key=lambda kv: kv[1]["rank"])
            chosen.append(float(pos[str(tok)]["logprob"]))
            best = [(tid, float(e["logprob"])) for tid, e in entries if e["rank"] <= k][:k]
            top_ids.append([tid for tid, _ in best])
            top_lps.append([lp for _, lp in best])
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise EndpointError(f"the endpoint's answer holds no prompt logprobs to score with ({type(e).__name__}: "
                            f"{e}): is it a vLLM server? (endpoint.scoring: vllm)") from None
    return Completion(query_id=q.id, teacher=teacher, token_ids=tokens, replica=replica,
                      model_fingerprint=fingerprint, prompt_tokens=prompt_len, token_logprobs=chosen,
                      top_ids=top_ids if k else [], top_logprobs=top_lps if k else [])


def _server_message(resp) -> str:
    try:
        err = resp.json().get("error")
        return err.get("message", str(err)) if isinstance(err, dict) else str(err or resp.text[:200])
    except ValueError:
        return resp.text[:200]


class OpenAITeacher(TeacherBase):
    """An OpenAI-compatible endpoint as a teacher. Construct in-process for tests, or via backpack/run/actors.py."""

    def __init__(self, cfg: TeacherConfig, replica: str = ""):
        import requests

        ep = cfg.endpoint
        if ep is None:
            raise TeacherError(cfg.name, "backend 'openai' needs an endpoint: section (base_url, ...)")
        self.cfg, self.ep, self.name, self.replica = cfg, ep, cfg.name, replica or cfg.name
        self.url = ep.base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        if ep.api_key_env:
            key = os.environ.get(ep.api_key_env)
            if not key:
                raise TeacherError(self.replica, f"the environment variable {ep.api_key_env} "
                                                 "(endpoint.api_key_env) holding the API key is not set")
            self.headers["Authorization"] = f"Bearer {key}"
        self.fingerprint = f"openai:{redact(ep.base_url.rstrip('/'))}:{cfg.model}"  # stored in every row
        self.limiter = RateLimiter(ep.requests_per_minute, ep.tokens_per_minute)
        self.session = requests.Session()
        self.pool = ThreadPoolExecutor(ep.concurrency, thread_name_prefix=f"{cfg.name}-http")
        self.stats = {"requests": 0, "retries": 0, "failed": 0}
        self._stats_lock = threading.Lock()  # the pool's threads count concurrently

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    def info(self) -> dict:
        return {"teacher": self.name, "replica": self.replica, "backend": "openai", "model": self.cfg.model,
                "base_url": redact(self.ep.base_url), "fingerprint": self.fingerprint, "device": "remote",
                "concurrency": self.ep.concurrency, **self.stats, "rate_limited_s": round(self.limiter.waited_s, 3)}

    def answer(self, qs: list[Query]) -> list[Completion]:
        results = list(self.pool.map(self._answer, qs))
        fatal = [r for r in results if isinstance(r, EndpointError) and r.fatal]
        if fatal or (results and all(isinstance(r, EndpointError) and r.retry for r in results)):
            # the endpoint is unusable (bad key, unknown model) or unreachable for every Query: the scheduler
            # re-routes the batch to another teacher instead of recording the prompts as failed here
            raise TeacherError(self.replica, str((fatal or results)[0]))
        completions = []
        for q, r in zip(qs, results):
            if isinstance(r, EndpointError):
                self._count("failed")
                c = Completion.failed(q.id, self.name, str(r), self.replica)
                c.model_fingerprint = self.fingerprint
                completions.append(c)
            else:
                completions += r
        return completions

    # ------------------------------------------------------------------ one Query

    def _answer(self, q: Query):
        """The Query's Completions, or the EndpointError that ended its tries."""
        if q.scoring:
            return self._with_retries(q, self._score, len(q.score_ids) + sum(
                len(str(m.get("content", ""))) for m in with_context(q.messages, q.context)) / 4)
        body = request_body(q, self.cfg.model)
        # admitted by the tokens-per-minute limit on an estimate: ~4 characters a token in, the most it may write
        estimate = sum(len(str(m.get("content", ""))) for m in body["messages"]) / 4 + q.decoding.max_new_tokens
        return self._with_retries(q, lambda q: self._post(q, body), estimate * q.decoding.n)

    def _with_retries(self, q: Query, call, estimate: float):
        err = None
        for attempt in range(self.ep.max_retries + 1):
            if attempt:
                self._count("retries")
                time.sleep(backoff_s(attempt - 1, self.ep.backoff_s, retry_after_s=err.retry_after))
            self.limiter.acquire(estimate)
            t0 = time.perf_counter()
            try:
                out = call(q)
            except EndpointError as e:
                err = e
                if e.retry:
                    continue
                return e
            for c in out:
                c.latency_s = time.perf_counter() - t0
            return out
        return EndpointError(f"gave up after {self.ep.max_retries} retries: {err}", retry=True)

    def _post(self, q: Query, body: dict) -> list[Completion]:
        return parse_response(q, self._request(self.url, body), self.name, self.replica, self.fingerprint)

    def _score(self, q: Query) -> list[Completion]:
        """q.score_ids scored by a vLLM server: the chat rendered to token ids by its /tokenize, then those ids
        and the completion's sent to /completions with echo, whose prompt logprobs are the scores."""
        if self.ep.scoring != "vllm":
            raise EndpointError(f"teacher {self.name!r} (openai at {redact(self.ep.base_url)}) cannot score "
                                "completions: only a vLLM server can (endpoint.scoring: vllm)", fatal=True)
        prompt = self._tokens({"model": self.cfg.model, "add_generation_prompt": True,
                               "messages": with_context(q.messages, q.context)})
        payload = self._request(self.url.removesuffix("/chat/completions") + "/completions",
                                score_body(prompt, q, self.cfg.model))
        return [parse_scores(q, payload, len(prompt), self.name, self.replica, self.fingerprint)]

    def tokenize(self, text: str) -> list[int]:
        """The token ids a vLLM server encodes `text` into (no special tokens). EndpointError if it cannot."""
        return self._tokens({"model": self.cfg.model, "prompt": text, "add_special_tokens": False})

    def _tokens(self, body: dict) -> list[int]:
        """The ids of a vLLM server's /tokenize answer to `body` (a text, or chat messages it renders)."""
        root = self.ep.base_url.rstrip("/").removesuffix("/v1")
        out = self._request(f"{root}/tokenize", body)
        try:
            return [int(t) for t in out["tokens"]]
        except (KeyError, TypeError, ValueError) as e:
            raise EndpointError(f"{redact(root)}/tokenize answered without token ids ({type(e).__name__}): is it "
                                "a vLLM server? (endpoint.scoring: vllm)") from None

    def _request(self, url: str, body: dict):
        """POST `body` to `url`; the answer's JSON, or the EndpointError that says what went wrong."""
        import requests

        shown = redact(url)
        self._count("requests")
        try:
            resp = self.session.post(url, json=body, headers=self.headers, timeout=self.ep.timeout_s)
        except requests.Timeout:
            raise EndpointError(f"no answer from {shown} within {self.ep.timeout_s} s", retry=True) from None
        except requests.ConnectionError as e:
            raise EndpointError(f"cannot reach {shown}: {type(e).__name__}", retry=True) from None
        if resp.status_code == 200:
            try:
                return resp.json()
            except ValueError:
                raise EndpointError(f"the endpoint answered 200 with something that is not JSON: "
                                    f"{resp.text[:200]!r}") from None
        message = f"{shown} answered {resp.status_code}: {_server_message(resp)}"
        if resp.status_code in RETRY_STATUS:
            after = resp.headers.get("Retry-After")
            raise EndpointError(message, retry=True,
                                retry_after=float(after) if after and after.replace(".", "", 1).isdigit() else None)
        if resp.status_code in TEACHER_STATUS:
            hint = f" (check the key in {self.ep.api_key_env})" if resp.status_code in (401, 403) else ""
            raise EndpointError(message + hint, fatal=True)
        raise EndpointError(message)
