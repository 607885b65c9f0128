"""Batched decoding for the `hf` teacher, in two ways that give the same answers.

`generate_batch` uses transformers' `generate`, which keeps computing every row of a batch until the longest
answer ends: rows that stopped early are padded at full cost. `decode_batch` is our own loop over the KV
cache that drops a row from the batch (and its cache) the step it stops, so a batch costs what its answers
cost. It also prefills the prompts in groups of similar length (little compute spent on the batch's padding),
cut within classes of prompts that begin alike where padding would cost more than another forward, forwards a
prefix a class or a group shares once for all of them, keeps the cache in buffers written in place (a stopped
row's place taken by a row from the tail, so only that row is copied) whose memory a teacher keeps from batch to
batch (`KVBuffers`), and on CPU attends over the grouped KV heads without copying them, each run of rows from
the first column it needs.
On 64 prompts x 64 new tokens with SmolLM2-135M on 2 cores: 166 tok/s against 87 for the same loop without
the prefill groups, the in-place cache and the CPU attention (benchmarks/teachers.py, through Backpack, one
batch of 64); the shared prefix added 1.11x there and 1.82x when the prompts share a ~180-token system prompt
(benchmarks/prefix_sharing.py); with the row moves, the class prefixes and the weights prepacked for oneDNN
(teachers/packed.py) it ran at 240-255 tok/s through Backpack, 0.98-1.00x vLLM's CPU build (each path timed in
a block of its own); with the KV memory kept between batches and the prefill groups cut by cost, 1.10-1.11x
(258-260 tok/s, the paths timed in interleaved rounds). It covers what Backpack's decoding asks for (greedy,
temperature / top-k / top-p sampling, repetition penalty, n samples, raw top-k logprobs), for the model families
whose KV cache can drop rows (`supports`); others use `generate`.

Both return a `Decoded`: per row, its tokens without the stop token, whether it stopped, and, when asked, the
chosen tokens' logprobs and the top-k ids/logprobs from the raw logits (the model's own distribution at
temperature 1, whatever decoding picked the token).
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from backpack.core.types import DecodingParams

# Architectures whose forward takes position_ids with left padding and whose DynamicCache can drop batch rows
# (checked token for token against `generate` in tests/test_teacher_hf.py for llama).
ROW_DROPPING_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Prompts per prefill forward at most. The batch's prompts are prefilled in groups of similar length, each padded
# only to its own longest prompt, and their caches joined: one forward over the whole left-padded batch spends up to
# half its compute on padding (64 prompts of 33-92 tokens: 5888 positions for 3032 prompt tokens). Where a class
# of prompts (`_classes`) is cut is chosen by `_prefill_groups`.
PREFILL_ROWS = 64
# What a prefill forward costs beyond its positions, counted in positions: measured here for SmolLM2-135M on 2
# cores, a forward took about 30 ms + 1.25 ms per position (8 to 2560 positions). A group is cut where the padding
# it saves costs more than another forward.
PREFILL_CALL_POSITIONS = 24
# Positions of one prefill forward at most (its activations grow with them), unless one prompt alone is longer.
PREFILL_POSITIONS = 2048
# Prompts of a prefill group that begin with the same tokens (the chat template's system prompt, a task's persona)
# share those tokens' KV: the shared prefix is forwarded once and its cache copied to the group's rows, as vLLM's
# prefix caching does (SmolLM2's default system prompt is 24 tokens, half of a short prompt). Shorter prefixes
# are not worth a forward of their own. Rows are grouped by their first PREFIX_BLOCK tokens before length, so
# prompts that share a prefix land in the same groups.
MIN_SHARED_PREFIX = 8
PREFIX_BLOCK = 16
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
def _cpu_attention(model):
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


class KVBuffers:
    """Storage for `decode_batch`'s KV cache kept from one batch to the next, by whoever decodes batch after batch
    (the hf teacher keeps one). A batch's KV buffers are hundreds of MB (64 rows x 156 positions: 460 MB for
    SmolLM2-135M); allocated afresh for each batch, glibc hands them back to the kernel at the end and the next
    batch faults its pages in again, which on CPU cost 0.3-0.7 s of a 12 s batch here (120-190 thousand page
    faults; 20-40 thousand with the storage kept). It grows to the largest batch asked of it and keeps that much.
    One batch at a time: a `decode_batch` that finds it in use by another thread allocates its own buffers."""

    GROWTH = 1.25  # room beyond the batch that asked, so slightly larger batches reuse it too

    def __init__(self):
        self._storage: dict[tuple, torch.Tensor] = {}
        self.lock = threading.Lock()

    def take(self, slot: tuple, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A tensor of `shape` (contents undefined) with `like`'s dtype and device, from the storage of `slot`."""
        need = math.prod(shape)
        flat = self._storage.get(slot)
        if flat is None or flat.numel() < need or flat.dtype != like.dtype or flat.device != like.device:
            flat = self._storage[slot] = None  # the old storage is freed before its successor is allocated
            with torch.inference_mode(False):  # a plain tensor: batches decoded in and out of inference mode share it
                flat = self._storage[slot] = torch.empty(int(need * self.GROWTH), dtype=like.dtype, device=like.device)
        return flat[:need].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._storage.values() if t is not None)


class _GrowingLayer(DynamicLayer):
    """A layer's KV cache in buffers sized for the whole answer: a decode step writes its column in place, where
    DynamicLayer concatenates (copies) the whole cache every step (a fifth of the decode time on CPU here)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._k, self._v, self.length = keys, values, length
        self._view()

    def _view(self) -> None:
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[2]:
            raise RuntimeError(f"KV cache buffer of {self._k.shape[2]} positions is full")
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self._view()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self._view()

    def keep_rows(self, order: list[int]) -> None:
        """Keep len(order) rows, row i becoming old row order[i], where `order` is a `_refill_order` (kept rows
        stay put, the holes take rows from the tail): only the rows that move are copied, in place, where
        `batch_select_indices` copies every row's whole buffer (5% of the decode time at 64 rows here)."""
        moves = [(i, j) for i, j in enumerate(order) if i != j]
        if moves:
            dst, src = torch.tensor([i for i, _ in moves]), torch.tensor([j for _, j in moves])
            self._k[dst, :, :self.length] = self._k[src, :, :self.length]
            self._v[dst, :, :self.length] = self._v[src, :, :self.length]
        self._k, self._v = self._k[:len(order)], self._v[:len(order)]
        self._view()


def _refill_order(keep: list[int], rows: int) -> list[int]:
    """The new order of a batch of `rows` that keeps the rows `keep` (ascending): a kept row keeps its place, and
    each place below len(keep) whose row left takes a kept row from beyond len(keep). No row is read after its
    place was written, so the move can be done in place (`_GrowingLayer.keep_rows`)."""
    n, kept = len(keep), set(keep)
    tail = [j for j in keep if j >= n]
    return [i if i in kept else tail.pop() for i in range(n)]


def _shared_prefix(rows: list[list[int]]) -> int:
    """How many leading tokens all of `rows` share, leaving each row at least one token of its own (the prefill
    must end on each row's own last token to give its next-token logits)."""
    first, most = rows[0], min(len(r) for r in rows) - 1
    n = 0
    while n < most and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def _windowed(config) -> bool:
    """Whether some layer attends within a sliding window: its masks count columns, so a row's cache must have
    no holes between its tokens (left padding only), which rules out a shared prefix."""
    return ("sliding_attention" in (getattr(config, "layer_types", None) or [])
            or (bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True)))


def _prefix_cache(model, tokens: list[int], upto: int, base, device) -> DynamicCache:
    """A one-row cache of `tokens[:upto]`: `base` (a (length, cache) pair of a shorter prefix, or None) is reused
    and only the tokens after it are forwarded. `base` itself is left as it was, for the next group."""
    start = base[0] if base else 0
    cache = DynamicCache([(layer.keys, layer.values) for layer in base[1].layers] if base else None)
    if upto > start:
        model(input_ids=torch.tensor([tokens[start:upto]], device=device),
              position_ids=torch.arange(start, upto, device=device)[None], past_key_values=cache, use_cache=True,
              logits_to_keep=1)
    return cache


def _forward_group(model, tokens: list[list[int]], share: bool, device, base=None):
    """Prefill one group's prompts (their real tokens) into a DynamicCache of the group's width w, laid out as
    [shared prefix | left padding | each row's own tokens]. `base`: a (length, one-row cache) prefix that all the
    group's rows begin with, already forwarded (their class's, `_classes`); the group's own shared prefix is
    forwarded on top of it when it is longer by MIN_SHARED_PREFIX or more. Returns (cache, last-position logits,
    attention [rows, w] of that layout). Without a shared prefix this is one forward of the left-padded prompts."""
    rows, w = len(tokens), max(map(len, tokens))
    floor = base[0] if base else 0
    shared = _shared_prefix(tokens) if share and rows > 1 else 0  # one row: no group prefix (its class's, if any)
    if shared < floor + MIN_SHARED_PREFIX:
        shared = floor
    cache = DynamicCache()
    if shared:
        cache = _prefix_cache(model, tokens[0], shared, base, device)
        cache.batch_repeat_interleave(rows)
    own = w - shared
    ids = torch.zeros(rows, own, dtype=torch.long)  # padding: any id does, it is masked
    attention = torch.zeros(rows, w, dtype=torch.long)
    attention[:, :shared] = 1
    positions = torch.zeros(rows, own, dtype=torch.long)
    for i, t in enumerate(tokens):
        n = len(t) - shared
        ids[i, own - n:] = torch.tensor(t[shared:])
        attention[i, w - n:] = 1
        positions[i, own - n:] = torch.arange(shared, len(t))
    # logits_to_keep=1: the prompt's logits are needed at its last position only (the lm head over every prompt
    # position of a 64-row batch is ~200 GFLOP here, as much as a dozen decode steps)
    ids, attention, positions = ids.to(device), attention.to(device), positions.to(device)
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    return out.past_key_values, out.logits[:, -1].float(), attention


def _classes(prompts: list[list[int]]) -> list[slice]:
    """The runs of rows (in `_prefill_order`) that begin with the same PREFIX_BLOCK tokens, and the runs of rows
    whose first block no other row has. Prefill groups are cut within a class, so a group never mixes two
    system prompts (its shared prefix would be lost), and a class's shared prefix is forwarded once for all its
    groups."""
    keys = _class_keys(prompts)
    runs, start = [], 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or keys[i] != keys[start]:
            runs.append(slice(start, i))
            start = i
    return runs


def _prefill_groups(lengths: list[int], max_rows: int) -> list[slice]:
    """Cut rows of ascending prompt `lengths` (a class's, past its shared prefix) into runs, each forwarded as one
    group padded to its longest prompt, so that the positions forwarded (padding included) plus
    PREFILL_CALL_POSITIONS per forward are fewest; a run has at most `max_rows` rows and PREFILL_POSITIONS
    positions (unless it is one row)."""
    n = len(lengths)
    best, cut = [0] + [math.inf] * n, [0] * (n + 1)  # best[j]: the cost of rows [0, j); cut[j]: where its run starts
    for j in range(1, n + 1):
        for i in range(j - 1, max(j - max_rows, 0) - 1, -1):  # the last run is rows [i, j)
            forwarded = (j - i) * lengths[j - 1]
            if j - i > 1 and forwarded > PREFILL_POSITIONS:
                break
            if best[i] + forwarded + PREFILL_CALL_POSITIONS < best[j]:
                best[j], cut[j] = best[i] + forwarded + PREFILL_CALL_POSITIONS, i
    runs, j = [], n
    while j:
        runs.append(slice(cut[j], j))
        j = cut[j]
    return runs[::-1]


def _prefill(model, prompts: list[list[int]], width: int, device, group_rows: int, share_prefix: bool,
             capacity: int, buffers: Optional[KVBuffers] = None):
    """Forward the prompts (their tokens, in `_prefill_order`) in groups of up to `group_rows` cut within each
    class (`_classes`) where `_prefill_groups` says, a class's shared prefix forwarded once and each group's
    longer one once on top of it (`_forward_group`), and join the groups' KV caches, left-padded to the batch
    `width` (the padding is masked, as it would have been in one forward), into buffers of `capacity` positions
    (from `buffers` when given). Returns (cache, last-position logits, the batch's attention mask for that layout,
    the order of the rows in it). Sliding-window layers get a full cache too (a DynamicCache made without the
    config has only plain layers): their masks keep attention within the window."""
    rows = len(prompts)
    share = share_prefix and not _windowed(model.config)
    groups = []
    for cls in _classes(prompts):
        n = _shared_prefix(prompts[cls]) if share and cls.stop - cls.start > 1 else 0
        parts = _prefill_groups([len(t) - n for t in prompts[cls]], group_rows)
        base = None
        if n >= MIN_SHARED_PREFIX and len(parts) > 1:  # more than one group: the class prefix once for all
            base = (n, _prefix_cache(model, prompts[cls.start], n, None, device))
        for run in parts:
            part = slice(cls.start + run.start, cls.start + run.stop)
            groups.append((part, *_forward_group(model, prompts[part], share, device, base)))
    # The batch's rows in decode order: the widest groups first, so that rows whose cache begins at the same
    # column are neighbours and a decode step's attention skips each run of rows' leading padding (ROW_CHUNKS).
    groups.sort(key=lambda g: -g[3].shape[1])
    order = [r for part, *_ in groups for r in range(part.start, part.stop)]
    places = []
    for part, *_ in groups:
        start = places[-1].stop if places else 0
        places.append(slice(start, start + part.stop - part.start))
    laid_out = torch.zeros(rows, width, dtype=torch.long, device=device)
    for place, (_, _, _, a) in zip(places, groups):
        laid_out[place, width - a.shape[1]:] = a
    cache = groups[0][1]
    for i, first in enumerate(cache.layers):
        kv = []
        for which in ("keys", "values"):
            like = getattr(first, which)
            shape = (rows, like.shape[1], capacity, like.shape[3])
            buf = buffers.take((i, which), shape, like) if buffers is not None else like.new_empty(shape)
            buf[:, :, :width].zero_()  # the padding is masked but must not be NaN (0 x NaN is NaN)
            for place, (_, c, _, a) in zip(places, groups):
                buf[place, :, width - a.shape[1]:width] = getattr(c.layers[i], which)
            kv.append(buf)
        cache.layers[i] = _GrowingLayer(*kv, length=width)
    return cache, torch.cat([logits for _, _, logits, _ in groups]), laid_out, order


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
    # Each row's prompt tokens (its left padding cut off), once; the batch runs in the order of `_prefill_order`
    # and `alive` maps back to the rows.
    width = input_ids.shape[1]
    prompts = [row[width - n:] for row, n in zip(input_ids.tolist(), attention.sum(-1).tolist())]
    order = _prefill_order(prompts)
    leased = buffers is not None and buffers.lock.acquire(blocking=False)
    try:
        with _cpu_attention(model):
            return _decode(model, input_ids[order], [prompts[r] for r in order], p, stop_ids, prefill_rows,
                           share_prefix, order, out, buffers if leased else None)
    finally:
        if leased:
            buffers.lock.release()


def _prefill_order(prompts: list[list[int]]) -> list[int]:
    """Rows by their first PREFIX_BLOCK tokens where other rows begin the same way (so that prompts sharing a
    prefix are prefilled together), then by prompt length (so that each prefill group is cut to a similar
    width); rows whose first block no other row has sort by length alone."""
    keys = _class_keys(prompts)
    return sorted(range(len(prompts)), key=lambda r: (keys[r], len(prompts[r])))


def _class_keys(prompts: list[list[int]]) -> list[tuple]:
    """Each row's first PREFIX_BLOCK tokens where another row begins the same way, else () (a class of its own
    for all such rows)."""
    blocks = [tuple(t[:PREFIX_BLOCK]) for t in prompts]
    counts = Counter(blocks)
    return [b if counts[b] > 1 else () for b in blocks]


def _decode(model, input_ids, prompts: list[list[int]], p: DecodingParams, stop_ids: set[int], prefill_rows: int,
            share_prefix: bool, alive: list[int], out: Decoded, buffers: Optional[KVBuffers]) -> Decoded:
    rows, width = input_ids.shape
    cache, logits, attention, order = _prefill(model, prompts, width, input_ids.device, prefill_rows, share_prefix,
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
            order = _refill_order(keep, len(alive))
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
