"""Reading the StudentServer's requests, pure: every malformed body becomes a BadRequest naming the field (a 4xx,
never a 500), and a good one the messages or prompt and the decoding it asks for."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from aiohttp import web

from backpack.core.types import DecodingParams

MAX_BODY = 1 << 20     # bytes of one request body (aiohttp's default, named so the 413 can say it)
MIN_TEMPERATURE = 1e-3  # above 0, a temperature under this overflows the logits (1e-300: every probability NaN)
MAX_SEED = 2 ** 63 - 1  # torch's generator takes a 64-bit seed


class BadRequest(Exception):
    def __init__(self, param: Optional[str], message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.message, self.status, self.kind = param, message, status, kind


@dataclass
class Asked:
    """What a request asks for: chat messages or a raw prompt, the decoding, and how to answer."""
    decoding: DecodingParams
    messages: Optional[list[dict]] = None   # /v1/chat/completions
    prompt: Optional[str] = None            # /v1/completions
    stream: bool = False
    include_usage: bool = False
    model: Optional[str] = None
    task: str = "default"


def field(body: dict, name: str, kind, ok, rule: str, default=None):
    """body[name] checked: absent or null gives `default`; a wrong type or value is a 400 naming the field."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind) or not ok(value):
        raise BadRequest(name, f"'{name}' must be {rule} (got {_shown(value)})")
    return value


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _finite(lo: float, hi: float, open_lo: bool = False):
    return lambda v: math.isfinite(v) and (lo < v if open_lo else lo <= v) and v <= hi


def _common(body, limit: int, default_max: int, default_task: str) -> Asked:
    if not isinstance(body, dict):
        raise BadRequest(None, "the request body must be a JSON object")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = field(body, name, int, lambda v: v >= 1, "an integer >= 1", default_max)
    field(body, "n", int, lambda v: v == 1, "1 (one choice per request)")
    if body.get("stop"):
        raise BadRequest("stop", "'stop' sequences are not supported by this server")
    if body.get("logprobs") not in (None, False, 0):
        raise BadRequest("logprobs", "'logprobs' are not supported by this server")
    options = field(body, "stream_options", dict, lambda v: True, "an object") or {}
    temperature = field(body, "temperature", (int, float),
                        lambda v: _finite(0, 2)(v) and (v == 0 or v >= MIN_TEMPERATURE),
                        f"0 (greedy) or a number from {MIN_TEMPERATURE} to 2", 0.0)
    decoding = DecodingParams(
        max_new_tokens=min(max_tokens, limit),  # the server's bound wins, as documented
        temperature=float(temperature),
        top_p=float(field(body, "top_p", (int, float), _finite(0, 1, open_lo=True), "a number in (0, 1]", 1.0)),
        seed=field(body, "seed", int, lambda v: 0 <= v <= MAX_SEED, f"an integer from 0 to {MAX_SEED}"))
    return Asked(decoding, stream=field(body, "stream", bool, lambda v: True, "true or false", False),
                 include_usage=bool(options.get("include_usage")),
                 model=field(body, "model", str, lambda v: True, "a string"),
                 task=field(body, "task", str, lambda v: bool(v), "a task name", default_task))


def parse_chat(body, limit: int, default_task: str = "default") -> Asked:
    """A /v1/chat/completions body; BadRequest naming the first bad field."""
    asked = _common(body, limit, limit, default_task)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages", "'messages' must be a non-empty list of {role, content} objects")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}]", f"messages[{i}] must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(c, dict) and c.get("type") == "text"
                                             and isinstance(c.get("text"), str) for c in content):
            content = "".join(c["text"] for c in content)  # OpenAI content parts: text only
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content", f"messages[{i}].content must be a string")
        clean.append({"role": m["role"], "content": content})
    asked.messages = clean
    return asked


def parse_completion(body, limit: int) -> Asked:
    """A /v1/completions body (one prompt string, or a list holding one); OpenAI's default of 16 new tokens."""
    asked = _common(body, limit, min(16, limit), "default")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("prompt", "'prompt' must be a non-empty string (one prompt per request)")
    if body.get("echo"):
        raise BadRequest("echo", "'echo' is not supported by this server")
    field(body, "suffix", str, lambda v: False, "absent (no insertion)")
    asked.prompt = prompt
    return asked


def error(status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error",
          headers: Optional[dict] = None) -> web.Response:
    """An OpenAI-shaped JSON error."""
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": None}},
                             status=status, headers=headers)
