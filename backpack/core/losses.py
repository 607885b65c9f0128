"""Distillation losses: pure functions over aligned tensors, tested against plain references on CPU.

Alignment convention (the caller shifts): position t of `logits` is the student's distribution for the token
at position t of `labels` / of the teacher's top-k arrays. Shapes: B batch, T positions, V vocabulary, K the
teacher's stored top-k.

Token-level KD only sees the teacher's top-k logprobs, so each distribution is collapsed onto K+1 buckets: the K
teacher tokens, plus one "tail" bucket holding the probability mass outside them (1 - sum of the K
probabilities, for the teacher and for the student alike). The divergences are computed exactly on those
buckets; with K = V they equal the full-vocabulary divergences.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

IGNORE = -100
_EPS = 1e-7
Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


def sequence_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sequence-level KD: cross-entropy on the teacher's response tokens only.

    logits [B, T, V] float; labels [B, T] int64 with IGNORE (-100) at prompt and padding positions.
    Returns the mean over non-ignored tokens (a scalar; 0 if there are none).
    """
    n = (labels != IGNORE).sum()
    if n == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum") / n


def _bucket_logprobs(log_k: torch.Tensor) -> torch.Tensor:
    """[.., K] logprobs of K tokens -> [.., K+1] with the log of the remaining mass appended."""
    covered = torch.logsumexp(log_k, dim=-1, keepdim=True).clamp(max=-_EPS)  # log(sum p_k) < 0
    tail = torch.log(-torch.expm1(covered))                                  # log(1 - sum p_k), stable
    return torch.cat([log_k, tail], dim=-1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last dim, from logprobs."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def topk_divergence(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                    mask: torch.Tensor, divergence: Divergence = "forward_kl", beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """Token-level KD against the teacher's stored top-k logprobs, out-of-top-k mass handled as one bucket.

    student_logits [B, T, V]; teacher_ids [B, T, K] int64; teacher_logprobs [B, T, K] (log p of those ids);
    mask [B, T] bool, True where the teacher has logprobs for the position.
    divergence: "forward_kl" = KL(p_teacher || q_student) (mode-covering), "reverse_kl" = KL(q || p)
    (mode-seeking), "jsd" = generalised Jensen-Shannon with weight beta in (0, 1):
    beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q.
    Returns the mean divergence over masked positions (a scalar; 0 if none).
    """
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1 (got {beta})")
    if divergence not in ("forward_kl", "reverse_kl", "jsd"):
        raise ValueError(f"unknown divergence {divergence!r}")
    log_q_all = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q = _bucket_logprobs(log_q_all.gather(-1, teacher_ids.long()))
    log_p = _bucket_logprobs(teacher_logprobs.float())
    if divergence == "forward_kl":
        per_pos = _kl(log_p, log_q)
    elif divergence == "reverse_kl":
        per_pos = _kl(log_q, log_p)
    else:
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
        per_pos = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    mask = mask.bool()
    n = mask.sum()
    if n == 0:
        return student_logits.sum() * 0.0
    return (per_pos * mask).sum() / n


def sampled_token_loss(student_logits: torch.Tensor, tokens: torch.Tensor, teacher_token_logprobs: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """On-policy distillation's sampled-token form: on tokens the student sampled itself, each position's reward
    is the teacher's logprob of the token minus the student's (r_t = log p(x_t) - log q(x_t), held constant), and
    the loss is -r_t log q(x_t), a policy gradient with the teacher as a per-token reward. In expectation over
    the student's samples its gradient is that of the full-vocabulary reverse KL(q || p), from one logprob per
    token of the teacher's (no top-k needed).

    student_logits [B, T, V]; tokens [B, T] int64 (the sampled tokens); teacher_token_logprobs [B, T] (log p of
    those tokens); mask [B, T] bool, True where a position counts. Returns the mean over masked positions.
    """
    log_q = F.log_softmax(student_logits.float(), dim=-1).gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    reward = (teacher_token_logprobs.float() - log_q).detach()
    mask = mask.bool()
    n = mask.sum()
    if n == 0:
        return student_logits.sum() * 0.0
    return -(reward * log_q * mask).sum() / n


def distill_loss(ce: torch.Tensor, kd: torch.Tensor, kd_weight: float) -> torch.Tensor:
    """The weighted mix: kd_weight * kd + (1 - kd_weight) * ce. kd_weight 0 is pure SFT, 1 pure KD."""
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must be in [0, 1] (got {kd_weight})")
    return kd_weight * kd + (1.0 - kd_weight) * ce
