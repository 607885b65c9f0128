"""Batched decoding for the `hf` teacher, in two ways that give the same answers.

`generate_batch` uses transformers' `generate`, which keeps computing every row of a batch until the longest
answer ends: rows that stopped early are padded at full cost. `decode_batch` is our own loop over the KV
cache that drops a row from the batch (and its cache) the step it stops, so a batch costs what its answers
cost: on 64 prompts x 64 new tokens with SmolLM2-135M on 2 cores, 159 tok/s against 120-150 for `generate`
(benchmarks/teachers.py measures it through Backpack). It covers what Backpack's decoding asks for (greedy,
temperature / top-k / top-p sampling, repetition penalty, n samples, raw top-k logprobs), for the model
families whose KV cache can drop rows (`supports`); others use `generate`.

Both return a `Decoded`: per row, its tokens without the stop token, whether it stopped, and, when asked, the
chosen tokens' logprobs and the top-k ids/logprobs from the raw logits (the model's own distribution at
temperature 1, whatever decoding picked the token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from backpack.core.types import DecodingParams

# Architectures whose forward takes position_ids with left padding and whose DynamicCache can drop batch rows
# (checked token for token against `generate` in tests/test_teacher_hf.py for llama).
ROW_DROPPING_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


@dataclass
class Decoded:
    tokens: list[list[int]]                   # per row (prompt x sample), the answer without its stop token
    stopped: list[bool]                       # ended on a stop token (else it reached max_new_tokens)
    chosen: Optional[list[list[float]]] = None        # per row, per token: logprob of the token
    top_ids: list[list[list[int]]] = field(default_factory=list)
    top_logprobs: list[list[list[float]]] = field(default_factory=list)


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
                 stop_ids: set[int]) -> Decoded:
    """Decode left-padded prompts [prompts, width] (n samples each: rows prompt-major), dropping rows as they
    stop. The caller seeds torch for seeded sampling."""
    if p.n > 1:
        input_ids, attention = input_ids.repeat_interleave(p.n, 0), attention.repeat_interleave(p.n, 0)
    rows = input_ids.shape[0]
    out = Decoded(tokens=[[] for _ in range(rows)], stopped=[False] * rows,
                  chosen=[[] for _ in range(rows)] if p.logprobs else None,
                  top_ids=[[] for _ in range(rows)] if p.logprobs else [],
                  top_logprobs=[[] for _ in range(rows)] if p.logprobs else [])
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    # logits_to_keep=1: the prompt's logits are needed at its last position only (the lm head over every prompt
    # position of a 64-row batch is ~200 GFLOP here, as much as a dozen decode steps)
    step_out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                     logits_to_keep=1)
    cache, logits = step_out.past_key_values, step_out.logits[:, -1].float()
    position = positions[:, -1:]
    seen = None
    if p.repetition_penalty != 1.0:
        seen = torch.zeros(rows, logits.shape[-1], dtype=torch.bool).scatter_(1, input_ids, True)
    alive = list(range(rows))  # the rows still in the batch, in batch order
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
            index = torch.tensor(keep)
            cache.batch_select_indices(index)
            attention, position, nxt = attention[index], position[index], nxt[index]
            seen = seen[index] if seen is not None else None
            alive = [alive[j] for j in keep]
        attention = torch.cat([attention, attention.new_ones(len(alive), 1)], dim=1)
        position = position + 1
        step_out = model(input_ids=nxt[:, None], attention_mask=attention, position_ids=position,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
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
