"""Scoring for the `hf` teacher: its logprobs of completions it did not write (on-policy distillation).

A batch of (prompt, completion) pairs is scored in two forwards: the prompts through the decode loop's prefill
(`prefill.py`: groups of similar length, a shared prefix forwarded once), whose last-position logits give the
distribution of each completion's first token; then every completion but its last token, right-padded, on top
of that KV cache, which gives the rest. Models whose cache the prefill cannot lay out (`decode.supports`) are
scored with one plain forward of the left-padded prompt + completion. Both give what a plain forward of each
pair on its own gives (tests/test_score.py), from the raw logits: the model's distribution at temperature 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from backpack.teachers.decode import cpu_attention, left_pad, supports
from backpack.teachers.kvcache import KVBuffers
from backpack.teachers.prefill import PREFILL_ROWS, prefill, prefill_order


@dataclass
class Scored:
    chosen: list[list[float]]            # per row, per completion token: the teacher's logprob of it
    top_ids: list[list[list[int]]]       # per row, per token: the teacher's top-k ids ([] per token when k == 0)
    top_logprobs: list[list[list[float]]]


def score_batch(model, prompts: list[list[int]], completions: list[list[int]], k: int, pad_id: int,
                share_prefix: bool = True, buffers: Optional[KVBuffers] = None) -> Scored:
    """The model's logprob of each completion token after its prompt, and its top `k` there (k = 0: none)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    device = next(model.parameters()).device
    if any(len(c) for c in completions):
        with torch.inference_mode():
            if supports(model):
                logits = _through_prefill(model, prompts, completions, device, share_prefix, buffers)
            else:
                logits = _plain(model, prompts, completions, pad_id, device)
    else:
        logits = [torch.empty(0, 0) for _ in prompts]
    out = Scored(chosen=[], top_ids=[], top_logprobs=[])
    for row_logits, tokens in zip(logits, completions):
        if not tokens:
            out.chosen.append([])
            out.top_ids.append([])
            out.top_logprobs.append([])
            continue
        logp = row_logits[:len(tokens)].float().log_softmax(-1)
        out.chosen.append(logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None]).squeeze(1).tolist())
        if k:
            top_lp, top_ids = logp.topk(k, dim=-1)
            out.top_ids.append(top_ids.tolist())
            out.top_logprobs.append(top_lp.tolist())
        else:
            out.top_ids.append([[] for _ in tokens])
            out.top_logprobs.append([[] for _ in tokens])
    return out


def _through_prefill(model, prompts, completions, device, share_prefix, buffers) -> list[torch.Tensor]:
    """Per row (in the given order), logits [len(completion), V]: the prefill's last position, then the
    completion's tokens but the last forwarded on the prefill's cache."""
    order = prefill_order(prompts)
    width = max(map(len, prompts))
    longest = max(map(len, completions))
    leased = buffers is not None and buffers.lock.acquire(blocking=False)
    try:
        with cpu_attention(model):
            cache, first, attention, placed = prefill(model, [prompts[r] for r in order], width, device,
                                                      PREFILL_ROWS, share_prefix, capacity=width + longest,
                                                      buffers=buffers if leased else None)
            rows = [order[j] for j in placed]  # the cache's rows -> the caller's rows
            rest = None
            if longest > 1:
                ids = torch.zeros(len(rows), longest - 1, dtype=torch.long)  # padding: any id, it is masked
                mask = torch.zeros(len(rows), longest - 1, dtype=torch.long)
                for i, r in enumerate(rows):
                    tail = completions[r][:-1]
                    ids[i, :len(tail)] = torch.tensor(tail, dtype=torch.long)
                    mask[i, :len(tail)] = 1
                start = torch.tensor([[len(prompts[r])] for r in rows])
                positions = start + torch.arange(longest - 1)[None]
                rest = model(input_ids=ids.to(device), attention_mask=torch.cat([attention, mask.to(device)], 1),
                             position_ids=positions.to(device), past_key_values=cache, use_cache=True).logits
    finally:
        if leased:
            buffers.lock.release()
    by_row: dict[int, torch.Tensor] = {}
    for i, r in enumerate(rows):
        parts = [first[i:i + 1].float()]
        if rest is not None:
            parts.append(rest[i].float())
        by_row[r] = torch.cat(parts)
    return [by_row[r] for r in range(len(prompts))]


def _plain(model, prompts, completions, pad_id, device) -> list[torch.Tensor]:
    """The same from one forward of the left-padded prompt + completion pairs (any architecture)."""
    joined = [p + c for p, c in zip(prompts, completions)]
    input_ids, attention = left_pad(joined, pad_id, device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions).logits
    width = input_ids.shape[1]
    out = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        end = width - 1  # the logits at position t are for token t + 1: the last token's are not needed
        out.append(logits[i, end - len(c):end])
    return out
