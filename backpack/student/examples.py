"""From dataset rows to training tensors: prompt tokens masked, the teacher's answer as labels, and the
teacher's top-k logprobs aligned to the answer tokens for token-level KD.

Rows come from the DatasetStore (DATASET_SCHEMA); only `status == "ok"` rows are used. The prompt is the
row's `messages` under the student's chat template (the same encoder the teacher used); the answer is the
teacher's own token ids when teacher and student share a tokenizer, else the answer text re-tokenised.
An answer that ended with the teacher's end-of-turn token gets that token as its last label, so the student
learns to stop. An on-policy row (a teacher's scores of the student's own sample, `score_ids` set) is taken as
it was scored: the sample's own stop token, if it stopped, is among its ids and was scored with the rest; the
teacher's logprob of each of its tokens comes along for the sampled-token loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from backpack.core.chat import encode_chat
from backpack.core.losses import IGNORE


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]                     # IGNORE at prompt positions
    kd_ids: list[list[int]]               # per position: the teacher's top-k ids ([] where none)
    kd_logprobs: list[list[float]]
    token_logprobs: list[float] = field(default_factory=list)  # per position: the teacher's logprob of the label


@dataclass
class BuildStats:
    rows: int = 0
    used: int = 0
    failed_rows: int = 0                  # teacher failures: nothing to learn from
    truncated: int = 0                    # longer than max_len: the answer was cut
    too_long_prompt: int = 0              # prompt alone fills max_len: skipped
    counts: dict = field(default_factory=dict)

    def add(self, other: "BuildStats") -> None:
        for k in ("rows", "used", "failed_rows", "truncated", "too_long_prompt"):
            setattr(self, k, getattr(self, k) + getattr(other, k))


def build_examples(rows: list[dict], tokenizer, max_len: int, same_tokenizer: bool,
                   use_logprobs: bool) -> tuple[list[Example], BuildStats]:
    """Dataset rows -> Examples. `same_tokenizer` uses the teacher's token ids (required for `use_logprobs`)."""
    if use_logprobs and not same_tokenizer:
        raise ValueError("token-level KD needs the teacher's tokenizer (same_tokenizer=True)")
    stats = BuildStats(rows=len(rows))
    out = []
    eos = tokenizer.eos_token_id
    for row in rows:
        if row["status"] != "ok":
            stats.failed_rows += 1
            continue
        prompt = encode_chat(tokenizer, row["messages"])
        if len(prompt) >= max_len:
            stats.too_long_prompt += 1
            continue
        answer = list(row["token_ids"]) if same_tokenizer else tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        top_ids = list(row["top_ids"] or []) if use_logprobs else []
        top_lps = list(row["top_logprobs"] or []) if use_logprobs else []
        kd_ids = [[] for _ in prompt] + [list(x) for x in top_ids[: len(answer)]]
        kd_lps = [[] for _ in prompt] + [list(x) for x in top_lps[: len(answer)]]
        scored = row.get("score_ids") is not None
        chosen = [0.0] * len(prompt) + [float(x) for x in (row["token_logprobs"] or [])[: len(answer)]] \
            if scored else []
        if row["finish_reason"] == "stop" and eos is not None and not scored:
            answer = answer + [eos]
        ids = prompt + answer
        labels = [IGNORE] * len(prompt) + answer
        if len(ids) > max_len:
            stats.truncated += 1
            ids, labels = ids[:max_len], labels[:max_len]
        kd_ids += [[] for _ in range(len(ids) - len(kd_ids))]
        kd_lps += [[] for _ in range(len(ids) - len(kd_lps))]
        out.append(Example(ids, labels, kd_ids[: len(ids)], kd_lps[: len(ids)], chosen[: len(ids)]))
        stats.used += 1
    return out, stats


def collate(examples: list[Example], pad_id: int, top_k: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded tensors for a batch.

    input_ids, attention_mask, labels [B, L]; with top_k > 0 also kd_ids, kd_logprobs [B, L, top_k] and
    kd_mask [B, L] (True where the teacher gave at least top_k logprobs). Positions without teacher data hold a
    uniform placeholder distribution, so masked positions stay finite. When the examples are on-policy ones
    (their token_logprobs set), teacher_logprobs [B, L] too: the teacher's logprob of each label (0 elsewhere).
    """
    width = max(len(e.input_ids) for e in examples)
    b = len(examples)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), IGNORE, dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if top_k:
        kd_ids = torch.zeros((b, width, top_k), dtype=torch.long)
        kd_lps = torch.full((b, width, top_k), math.log(1.0 / (top_k + 1)))
        kd_mask = torch.zeros((b, width), dtype=torch.bool)
        batch.update(kd_ids=kd_ids, kd_logprobs=kd_lps, kd_mask=kd_mask)
    if any(e.token_logprobs for e in examples):
        batch["teacher_logprobs"] = torch.zeros((b, width))
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        attention[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
        if e.token_logprobs:
            batch["teacher_logprobs"][i, :len(e.token_logprobs)] = torch.tensor(e.token_logprobs)
        if top_k:
            for j, (ids, lps) in enumerate(zip(e.kd_ids, e.kd_logprobs)):
                if len(ids) >= top_k:
                    kd_ids[i, j] = torch.tensor(ids[:top_k])
                    kd_lps[i, j] = torch.tensor(lps[:top_k])
                    kd_mask[i, j] = True
    return batch
