"""Batched decoding for the `hf` teacher, in two ways that give the same answers.

`generate_batch` uses transformers' `generate`, which keeps computing every row of a batch until the longest
answer ends: rows that stopped early are padded at full cost. `decode_batch` is our own loop over the KV cache
that drops a row from the batch (and its cache) the step it stops, so a batch costs what its answers cost. Its
prompts are prefilled in groups of similar length with shared prefixes forwarded once (`prefill.py`), its cache
lives in buffers written in place whose memory a teacher keeps between batches (`kvcache.py`), and on CPU it
attends over the grouped KV heads without copying them, each run of rows from the first column it needs. It
covers what Backpack's decoding asks for (greedy, temperature / top-k / top-p sampling, repetition penalty, n
samples, raw top-k logprobs) for the model families whose KV cache can drop rows (`supports`); others use
`generate`. What each part gains is measured in benchmarks/ (see benchmarks/README.md).

Both return a `Decoded`: per row, its tokens without the stop token, whether it stopped, and, when asked, the
chosen tokens' logprobs and the top-k ids/logprobs from the raw logits (the model's own distribution at
temperature 1, whatever decoding picked the token).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from backpack.core.types import DecodingParams
from backpack.teachers.kvcache import KVBuffers, refill_order
from backpack.teachers.prefill import PREFILL_ROWS, prefill, prefill_order

# Architectures whose forward takes position_ids with left padding and whose DynamicCache can drop batch rows
# (checked token for token against `generate` in tests/test_teacher_hf.py for llama).
ROW_DROPPING_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# The attention this loop runs on CPU (registered below): transformers' sdpa copies every KV head n times for
# grouped-query models whenever there is a mask (torch's CUDA kernels need it), which on CPU costs more than
# the attention itself; torch's CPU kernels take the grouped heads as they are (enable_gqa), same result.
CPU_GQA_ATTENTION = "backpack_cpu_gqa_sdpa"
# A decode step's attention reads every row's whole KV cache, padding included, and on CPU it is bound by memory
# bandwidth (1.2 ms a layer for 64 rows x 124 columns). The rows are ordered by the column their cache begins at
# and cut into this many runs, each attending from its own first column on.
ROW_CHUNKS = 4


@dataclass
class Decoded:
    tokens: list[list[int]]                   # per row (prompt x sample), the answer without its stop token
    stopped: list[bool]                       # ended on a stop token (else it reached max_new_tokens)
    chosen: Optional[list[list[float]]] = None        # per row, per token: logprob of the token
    top_ids: list[list[list[int]]] = field(default_factory=list)
    top_logprobs: list[list[list[float]]] = field(default_factory=list)


def left_pad(ids: list[list[int]], pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts' token ids as the left-padded batch both decoders take: (input ids, attention mask)."""
    width = max(map(len, ids))
    return (torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device),
            torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device))


def _row_chunks(starts: list[int], pieces: Optional[int] = None) -> list[tuple[int, int, int]]:
    """(first row, end row, first column) of ROW_CHUNKS runs of neighbouring rows: the columns before a run's
    first column are padding for all its rows (`starts`: each row's first column that is not), so its attention
    need not read them."""
    n = len(starts)
    size = -(-n // (pieces or ROW_CHUNKS))
    return [(a, min(a + size, n), min(starts[a:a + size])) for a in range(0, n, size)]


def _gqa_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
              backpack_row_chunks=None, **kwargs):
    """transformers' sdpa attention without repeating the KV heads (see CPU_GQA_ATTENTION). A decode step of
    `decode_batch` passes its `_row_chunks`: each run of rows attends from its first column on."""
    if backpack_row_chunks and query.shape[2] == 1:
        gqa = key.shape[1] != query.shape[1]
        outs = [F.scaled_dot_product_attention(
            query[a:b], key[a:b, :, col:], value[a:b, :, col:], scale=scaling, enable_gqa=gqa,
            attn_mask=None if attention_mask is None else attention_mask[a:b, :, :, col:])
            for a, b, col in backpack_row_chunks]
        return torch.cat(outs).transpose(1, 2).contiguous(), None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                         is_causal=query.shape[2] > 1 and attention_mask is None and causal,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(CPU_GQA_ATTENTION, _gqa_sdpa)
AttentionMaskInterface.register(CPU_GQA_ATTENTION, sdpa_mask)  # the same masks as sdpa


@contextmanager
def cpu_attention(model):
    """Run `model` with CPU_GQA_ATTENTION for the duration, when it is on CPU with sdpa attention."""
    before = model.config._attn_implementation
    if before != "sdpa" or model.device.type != "cpu":
        yield
        return
    model.set_attn_implementation(CPU_GQA_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def supports(model) -> bool:
    """Whether `decode_batch` may run `model` (else use `generate_batch`)."""
    return getattr(model.config, "model_type", None) in ROW_DROPPING_MODEL_TYPES


def _pick(logits: torch.Tensor, p: DecodingParams, seen: Optional[torch.Tensor]) -> torch.Tensor:
    """Next token per row from float logits [rows, vocab], as transformers' processors would: repetition
    penalty, then greedy, or temperature -> top-k -> top-p -> a draw."""
    if seen is not None:  # penalise every token already in the row (prompt included), by sign as HF does
        penalised = torch.where(logits < 0, logits * p.repetition_penalty, logits / p.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if p.greedy:
        return logits.argmax(-1)
    logits = logits / p.temperature
    if p.top_k:
        kth = logits.topk(min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs > p.top_p       # tokens after the top_p mass is reached (never the first)
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(-1)


def decode_batch(model, input_ids: torch.Tensor, attention: torch.Tensor, p: DecodingParams,
                 stop_ids: set[int], prefill_rows: int = PREFILL_ROWS, share_prefix: bool = True,
                 buffers: Optional[KVBuffers] = None) -> Decoded:
    """Decode left-padded prompts [prompts, width] (n samples each: rows prompt-major), dropping rows as they
    stop. `share_prefix=False` forwards every prompt whole (the same answers; for measuring what sharing saves).
    `buffers`: where to keep the KV cache (fresh buffers for this batch when None or in use). The caller seeds
    torch for seeded sampling."""
    if p.n > 1:
        input_ids, attention = input_ids.repeat_interleave(p.n, 0), attention.repeat_interleave(p.n, 0)
    rows = input_ids.shape[0]
    out = Decoded(tokens=[[] for _ in range(rows)], stopped=[False] * rows,
                  chosen=[[] for _ in range(rows)] if p.logprobs else None,
                  top_ids=[[] for _ in range(rows)] if p.logprobs else [],
                  top_logprobs=[[] for _ in range(rows)] if p.logprobs else [])
    # Each row's prompt tokens (its left padding cut off), once; the batch runs in the order of `prefill_order`
    # and `alive` maps back to the rows.
    width = input_ids.shape[1]
    prompts = [row[width - n:] for row, n in zip(input_ids.tolist(), attention.sum(-1).tolist())]
    order = prefill_order(prompts)
    leased = buffers is not None and buffers.lock.acquire(blocking=False)
    try:
        with cpu_attention(model):
            return _decode(model, input_ids[order], [prompts[r] for r in order], p, stop_ids, prefill_rows,
                           share_prefix, order, out, buffers if leased else None)
    finally:
        if leased:
            buffers.lock.release()


def _decode(model, input_ids, prompts: list[list[int]], p: DecodingParams, stop_ids: set[int], prefill_rows: int,
            share_prefix: bool, alive: list[int], out: Decoded, buffers: Optional[KVBuffers]) -> Decoded:
    rows, width = input_ids.shape
    cache, logits, attention, order = prefill(model, prompts, width, input_ids.device, prefill_rows, share_prefix,
                                               capacity=width + p.max_new_tokens, buffers=buffers)
    prompts, alive, input_ids = [prompts[j] for j in order], [alive[j] for j in order], input_ids[order]
    position = torch.tensor([[len(t) - 1] for t in prompts], device=input_ids.device)  # of each last token
    starts = attention.argmax(-1).tolist()  # each row's first column that is not padding
    chunks = _row_chunks(starts)
    ours = model.config._attn_implementation == CPU_GQA_ATTENTION  # (other attention functions take no chunks)
    seen = None
    if p.repetition_penalty != 1.0:
        seen = torch.zeros(rows, logits.shape[-1], dtype=torch.bool).scatter_(1, input_ids, True)
    for step in range(p.max_new_tokens):
        nxt = _pick(logits, p, seen)
        if p.logprobs:
            logp = logits.log_softmax(-1)
            chosen = logp.gather(1, nxt[:, None]).squeeze(1).tolist()
            top_lp, top_ids = logp.topk(p.logprobs, dim=-1)
            top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
        keep = []
        for j, (row, token) in enumerate(zip(alive, nxt.tolist())):
            if token in stop_ids:
                out.stopped[row] = True
                continue
            out.tokens[row].append(token)
            if p.logprobs:
                out.chosen[row].append(chosen[j])
                out.top_ids[row].append(top_ids[j])
                out.top_logprobs[row].append(top_lp[j])
            keep.append(j)
        if not keep or step == p.max_new_tokens - 1:
            break
        if seen is not None:
            seen[torch.arange(len(alive)), nxt] = True
        if len(keep) < len(alive):  # drop the rows that stopped, from the cache too
            order = refill_order(keep, len(alive))
            for layer in cache.layers:
                layer.keep_rows(order)
            index = torch.tensor(order)
            attention, position, nxt = attention[index], position[index], nxt[index]
            seen = seen[index] if seen is not None else None
            alive = [alive[j] for j in order]
            starts = [starts[j] for j in order]
            chunks = _row_chunks(starts)
        attention = torch.cat([attention, attention.new_ones(len(alive), 1)], dim=1)
        position = position + 1
        step_out = model(input_ids=nxt[:, None], attention_mask=attention, position_ids=position,
                         past_key_values=cache, use_cache=True, logits_to_keep=1,
                         backpack_row_chunks=chunks if ours else None)
        logits = step_out.logits[:, -1].float()
    return out


def generate_batch(model, input_ids: torch.Tensor, attention: torch.Tensor, p: DecodingParams, stop_ids: set[int],
                   pad_id: int) -> Decoded:
    """The same through transformers' `generate` (any architecture)."""
    kwargs = dict(max_new_tokens=p.max_new_tokens, num_return_sequences=p.n, pad_token_id=pad_id,
                  repetition_penalty=p.repetition_penalty, return_dict_in_generate=True, output_logits=p.logprobs > 0)
    if p.greedy:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    else:
        kwargs.update(do_sample=True, temperature=p.temperature, top_k=p.top_k or None, top_p=p.top_p)
    gen = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
    width = input_ids.shape[1]
    new = gen.sequences[:, width:]
    out = Decoded(tokens=[], stopped=[])
    for tokens in new.tolist():
        end = next((j for j, t in enumerate(tokens) if t in stop_ids), None)
        out.tokens.append(tokens[:end] if end is not None else tokens)
        out.stopped.append(end is not None)
    if p.logprobs:
        logp = torch.stack(gen.logits, dim=1).float().log_softmax(-1)        # [rows, steps, vocab], raw logits
        chosen = logp.gather(-1, new[:, : logp.shape[1]].unsqueeze(-1)).squeeze(-1).tolist()
        top_lp, top_ids = logp.topk(p.logprobs, dim=-1)
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
        n = [len(t) for t in out.tokens]
        out.chosen = [c[:k] for c, k in zip(chosen, n)]
        out.top_ids = [t[:k] for t, k in zip(top_ids, n)]
        out.top_logprobs = [t[:k] for t, k in zip(top_lp, n)]
    return out
