"""One training step's loss for a student batch: shift, sequence CE, optional top-k KD, the mix; and the
on-policy loss on the student's own scored samples."""

from __future__ import annotations

import torch

from backpack.core.losses import IGNORE, distill_loss, sampled_token_loss, sequence_ce, topk_divergence


def student_loss(model, batch: dict[str, torch.Tensor], kd_weight: float = 0.0, divergence: str = "forward_kl",
                 beta: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of `model` on a `collate` batch. Logits at position t predict the token at t + 1, so logits drop
    their last position and labels / KD arrays their first. Returns (loss, {"ce", "kd", "tokens"})."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1]
    labels = batch["labels"][:, 1:]
    ce = sequence_ce(logits, labels)
    kd = torch.zeros((), device=ce.device)
    if kd_weight > 0:
        kd = topk_divergence(logits, batch["kd_ids"][:, 1:], batch["kd_logprobs"][:, 1:], batch["kd_mask"][:, 1:],
                             divergence=divergence, beta=beta)
    loss = distill_loss(ce, kd, kd_weight)
    return loss, {"ce": float(ce.detach()), "kd": float(kd.detach()), "tokens": int((labels != -100).sum())}


def on_policy_loss(model, batch: dict[str, torch.Tensor], loss: str = "forward_kl",
                   beta: float = 0.5) -> tuple[torch.Tensor, dict]:
    """Loss of `model` on a `collate` batch of its own samples scored by a teacher: a divergence ("forward_kl",
    "reverse_kl" or "jsd" with `beta`) to the teacher's top-k at each sampled position (kd arrays), or "sampled"
    (teacher_logprobs: the teacher's logprob of each sampled token).
    Returns (loss, {"ce": the samples' NLL under the student, "kd": the loss, "tokens"})."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    if loss == "sampled":
        value = sampled_token_loss(logits, labels.clamp(min=0), batch["teacher_logprobs"][:, 1:], mask)
    else:
        value = topk_divergence(logits, batch["kd_ids"][:, 1:], batch["kd_logprobs"][:, 1:],
                                batch["kd_mask"][:, 1:] & mask, divergence=loss, beta=beta)
    with torch.no_grad():
        nll = sequence_ce(logits, labels)
    return value, {"ce": float(nll), "kd": float(value.detach()), "tokens": int(mask.sum())}
