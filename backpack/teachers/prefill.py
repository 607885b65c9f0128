"""Prefill for the hf teacher's decode loop: the prompts of a batch forwarded in groups of similar length, cut
within classes of prompts that begin alike where padding would cost more than another forward, with a prefix a
class or a group shares forwarded once for all of them (as vLLM's prefix caching does), and the groups' caches
joined into the batch's KV buffers (`backpack.teachers.kvcache`)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Optional

import torch
from transformers.cache_utils import DynamicCache

from backpack.teachers.kvcache import GrowingLayer, KVBuffers

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


def prefill_order(prompts: list[list[int]]) -> list[int]:
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
    """The runs of rows (in `prefill_order`) that begin with the same PREFIX_BLOCK tokens, and the runs of rows
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


def prefill(model, prompts: list[list[int]], width: int, device, group_rows: int, share_prefix: bool,
             capacity: int, buffers: Optional[KVBuffers] = None):
    """Forward the prompts (their tokens, in `prefill_order`) in groups of up to `group_rows` cut within each
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
        cache.layers[i] = GrowingLayer(*kv, length=width)
    return cache, torch.cat([logits for _, _, logits, _ in groups]), laid_out, order
