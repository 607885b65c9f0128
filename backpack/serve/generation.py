"""Generating one answer of the StudentServer: in a worker thread, stopped when its client goes away or its
deadline passes."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Optional

import torch

from backpack.core.types import LENGTH, STOP, DecodingParams
from backpack.teachers.hf import HFTeacher


class _Cancelled:
    """A stopping criterion (duck-typed, so this module need not import transformers) that ends a generation
    whose client has gone away, so the next request does not wait for tokens nobody reads."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def generate(gen: HFTeacher, ids: list[int], p: DecodingParams, streamer=None, cancel=None) -> tuple[list[int], str]:
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


class _TokenStreamer:
    """transformers' streamer protocol (put the prompt, then each new token; end): new token ids to a queue."""

    def __init__(self, loop, out: asyncio.Queue):
        self.loop, self.out, self.prompt_seen = loop, out, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for t in value.flatten().tolist():
            self.loop.call_soon_threadsafe(self.out.put_nowait, int(t))

    def end(self) -> None:
        pass


async def generate_until(request, gen, ids: list[int], decoding: DecodingParams, deadline: float,
                         tokens_out: Optional[asyncio.Queue] = None):
    """Generate in a worker thread, one request at a time, stopping it when the deadline passes or the client
    goes away; with `tokens_out`, each new token id is put there as it comes (None at the end). Returns (tokens,
    finish reason, None | "timed_out" | "gone")."""
    if _gone(request):  # it waited in the queue and its client left meanwhile: nothing to generate
        if tokens_out is not None:
            tokens_out.put_nowait(None)
        return [], STOP, "gone"
    cancel = threading.Event()
    streamer = _TokenStreamer(asyncio.get_running_loop(), tokens_out) if tokens_out is not None else None
    job = asyncio.ensure_future(asyncio.to_thread(generate, gen, ids, decoding, streamer, cancel))
    ended = await _watch(request, job, deadline, cancel)
    if tokens_out is not None:
        tokens_out.put_nowait(None)
    tokens, finish = job.result()
    return tokens, finish, ended


async def _watch(request, running: asyncio.Future, deadline: float, cancel: threading.Event) -> Optional[str]:
    """Wait for `running`, setting `cancel` once the deadline passes ("timed_out") or the client goes away
    ("gone"); returns which, or None."""
    ended = None
    while not running.done():
        await asyncio.wait([running], timeout=0.2)
        if running.done() or ended:
            continue
        if time.perf_counter() > deadline:
            ended = "timed_out"
        elif _gone(request):
            ended = "gone"
        if ended:
            cancel.set()
    return ended


def _gone(request) -> bool:
    return request.transport is None or request.transport.is_closing()


def usage(ids: list[int], tokens: list[int]) -> dict:
    return {"prompt_tokens": len(ids), "completion_tokens": len(tokens), "total_tokens": len(ids) + len(tokens)}


def reachable_host(host: str) -> str:
    """The host for the URL clients use: a wildcard address names this node's IP instead."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    try:
        import ray  # on a cluster the node IP Ray uses is the one other nodes reach

        return ray.util.get_node_ip_address()
    except Exception:
        return "127.0.0.1"


async def run_job(request, engine, job, deadline: float, tokens_out: Optional[asyncio.Queue] = None):
    """Submit `job` to the batch engine and wait for it, cancelling it when the deadline passes or the client
    goes away; with `tokens_out`, each new token id is put there as it comes (None at the end). Returns None |
    "timed_out" | "gone"; raises the job's error."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    job.on_done = lambda: loop.call_soon_threadsafe(_resolve, finished)
    if tokens_out is not None:
        job.on_token = lambda t: loop.call_soon_threadsafe(tokens_out.put_nowait, t)
    if _gone(request):  # it waited and its client left meanwhile: nothing to generate
        ended = "gone"
    else:
        engine.submit(job)
        ended = await _watch(request, finished, deadline, job.cancel)
    if tokens_out is not None:
        tokens_out.put_nowait(None)
    if job.error is not None:
        raise job.error
    return ended


def _resolve(fut) -> None:
    if not fut.done():
        fut.set_result(None)
