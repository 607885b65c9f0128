"""Scoring a student version on held-out prompts against the teacher's stored answers.

Metrics per version: per-token NLL and perplexity of the teacher's answers under the student (teacher-forced),
chrF agreement of the student's greedy answers with the teacher's answers (sacrebleu), the mean forward KL to
the teacher's stored top-k distribution (where the teacher stored logprobs), the student's size and its
generation speed. The held-out rows are those `backpack.data.splits` holds out.
"""

from __future__ import annotations

import math
import time

import torch

from backpack.core.losses import sequence_ce, topk_divergence
from backpack.core.types import DecodingParams, Query


def _teacher_forced(model, tokenizer, rows, max_len: int, top_k: int, batch_size: int) -> tuple[float, float, int]:
    """(NLL per token, mean KL to the teacher's top-k or NaN, tokens)."""
    from backpack.student.examples import build_examples, collate

    use_kd = top_k > 0 and all(r["top_ids"] for r in rows)
    examples, _ = build_examples(rows, tokenizer, max_len, same_tokenizer=True, use_logprobs=use_kd)
    nll_sum, kl_sum, kl_n, tokens = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size], tokenizer.pad_token_id, top_k if use_kd else 0)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            n = int((labels != -100).sum())
            nll_sum += float(sequence_ce(logits, labels)) * n
            tokens += n
            if use_kd:
                mask = batch["kd_mask"][:, 1:]
                m = int(mask.sum())
                kl_sum += float(topk_divergence(logits, batch["kd_ids"][:, 1:], batch["kd_logprobs"][:, 1:], mask)) * m
                kl_n += m
    return nll_sum / max(1, tokens), (kl_sum / kl_n if kl_n else float("nan")), tokens


def evaluate_model(model, tokenizer, rows: list[dict], name: str, max_new_tokens: int = 64, max_len: int = 512,
                   top_k: int = 4, batch_size: int = 8, generate: bool = True) -> dict:
    """All metrics of one model on held-out teacher rows (status ok).

    With `generate=False` only the teacher-forced metrics are computed (nll, perplexity, kl_to_teacher, with
    eval_rows, eval_tokens, params): one forward pass per batch and no greedy answers, so the keys that need
    them (chrf, gen_tokens_per_s, answers, samples) are left out. The promotion gate uses this for nll and kl."""
    rows = [r for r in rows if r["status"] == "ok"]
    if not rows:
        raise ValueError("no held-out rows to evaluate on")
    model.eval()
    nll, kl, tokens = _teacher_forced(model, tokenizer, rows, max_len, top_k, batch_size)
    params = sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())  # tied weights once
    out = {"nll": nll, "perplexity": math.exp(min(nll, 50.0)), "kl_to_teacher": kl,
           "eval_rows": len(rows), "eval_tokens": tokens, "params": params}
    if generate:
        out.update(_greedy_metrics(model, tokenizer, rows, name, max_new_tokens, batch_size))
    return out


def _greedy_metrics(model, tokenizer, rows: list[dict], name: str, max_new_tokens: int, batch_size: int) -> dict:
    """chrF of the model's greedy answers against the teacher's, its generation speed, and a few samples."""
    from sacrebleu.metrics import CHRF

    from backpack.teachers.hf import HFTeacher

    # greedy answers through the same generation code the teachers use
    greedy = DecodingParams(max_new_tokens=max_new_tokens)
    queries = [Query(messages=r["messages"], decoding=greedy, task=r["task"], id=r["query_id"]) for r in rows]
    gen = HFTeacher.from_model(name, model, tokenizer, fingerprint=name, batch_size=batch_size)
    t0 = time.perf_counter()
    answers = gen.answer(queries)
    seconds = time.perf_counter() - t0
    by_id = {a.query_id: a for a in answers}
    hyps = [by_id[r["query_id"]].text for r in rows]
    refs = [r["text"] for r in rows]
    chrf = CHRF().corpus_score(hyps, [refs]).score
    gen_tokens = sum(a.tokens_generated for a in answers)
    return {"chrf": chrf, "gen_tokens_per_s": gen_tokens / seconds if seconds else 0.0,
            "answers": {r["query_id"]: h for r, h in zip(rows, hyps)},  # what a judge grades (backpack eval --judge)
            "samples": [{"prompt": r["messages"][-1]["content"], "teacher": r["text"], "student": h}
                        for r, h in list(zip(rows, hyps))[:3]]}
