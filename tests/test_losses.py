"""The KD losses against plain references (python floats, explicit loops) and their properties."""

import math

import pytest
import torch
import torch.nn.functional as F

from backpack.core.losses import IGNORE, distill_loss, sampled_token_loss, sequence_ce, topk_divergence

B, T, V = 2, 5, 11


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, T, V, generator=g) * 2, torch.randn(B, T, V, generator=g) * 2  # student, teacher


def teacher_topk(teacher_logits, k):
    lp = F.log_softmax(teacher_logits, -1)
    vals, ids = lp.topk(k, -1)
    return ids, vals


def ref_bucket(dist: list[float], ids: list[int]) -> list[float]:
    kept = [dist[i] for i in ids]
    tail = 1.0 - sum(kept)
    return kept + [tail if tail > 1e-12 else 0.0]  # k == V: no tail (rounding aside)


def ref_kl(a: list[float], b: list[float]) -> float:
    return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b) if x > 0)


def ref_divergence(student, teacher, k, mask, kind, beta=0.5):
    total, n = 0.0, 0
    for bi in range(B):
        for t in range(T):
            if not mask[bi][t]:
                continue
            p_full = torch.softmax(teacher[bi, t].double(), -1).tolist()
            q_full = torch.softmax(student[bi, t].double(), -1).tolist()
            ids = sorted(range(V), key=lambda i: -p_full[i])[:k]
            p, q = ref_bucket(p_full, ids), ref_bucket(q_full, ids)
            if kind == "forward_kl":
                d = ref_kl(p, q)
            elif kind == "reverse_kl":
                d = ref_kl(q, p)
            else:
                m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
                d = beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
            total, n = total + d, n + 1
    return total / n


def test_sequence_ce_matches_reference(logits):
    student, _ = logits
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    labels[0, :2] = IGNORE  # prompt tokens
    labels[1, 4] = IGNORE   # padding
    ref, n = 0.0, 0
    for bi in range(B):
        for t in range(T):
            if labels[bi, t] != IGNORE:
                ref -= F.log_softmax(student[bi, t].double(), -1)[labels[bi, t]].item()
                n += 1
    assert sequence_ce(student, labels).item() == pytest.approx(ref / n, rel=1e-5)
    assert sequence_ce(student, torch.full((B, T), IGNORE)).item() == 0.0


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("k", [1, 3, V])
def test_topk_divergence_matches_reference_with_tail_mass(logits, kind, k):
    student, teacher = logits
    ids, lps = teacher_topk(teacher, k)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    got = topk_divergence(student, ids, lps, mask, divergence=kind, beta=0.3 if kind == "jsd" else 0.5)
    want = ref_divergence(student, teacher, k, mask.tolist(), kind, beta=0.3)
    assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_full_vocab_equals_torch_kl(logits):
    student, teacher = logits
    ids, lps = teacher_topk(teacher, V)
    mask = torch.ones(B, T, dtype=torch.bool)
    log_q, log_p = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    fwd = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / (B * T)
    rev = F.kl_div(log_p, log_q, log_target=True, reduction="sum") / (B * T)
    assert topk_divergence(student, ids, lps, mask).item() == pytest.approx(fwd.item(), rel=1e-4)
    assert topk_divergence(student, ids, lps, mask, "reverse_kl").item() == pytest.approx(rev.item(), rel=1e-4)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_zero_for_identical_distributions_and_positive_otherwise(logits, kind):
    student, teacher = logits
    ids, lps = teacher_topk(teacher, 4)
    mask = torch.ones(B, T, dtype=torch.bool)
    assert topk_divergence(teacher, ids, lps, mask, kind).item() == pytest.approx(0.0, abs=1e-5)
    assert topk_divergence(student, ids, lps, mask, kind).item() > 0.01


def test_masked_positions_do_not_count_and_gradients_flow(logits):
    student, teacher = logits
    ids, lps = teacher_topk(teacher, 3)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, -1] = False
    changed = student.clone()
    changed[:, -1] += 100.0
    assert topk_divergence(student, ids, lps, mask).item() == pytest.approx(
        topk_divergence(changed, ids, lps, mask).item(), rel=1e-6)
    s = student.clone().requires_grad_(True)
    topk_divergence(s, ids, lps, mask, "jsd").backward()
    assert torch.isfinite(s.grad).all() and s.grad[:, :-1].abs().sum() > 0 and s.grad[:, -1].abs().sum() == 0


def test_extreme_logits_stay_finite():
    student = torch.zeros(1, 2, V)
    student[0, :, 0] = 80.0  # student puts all mass on one token
    teacher_ids = torch.tensor([[[0, 1]], [[2, 3]]]).view(1, 2, 2)
    teacher_lps = torch.log(torch.tensor([[[0.999999, 1e-7]], [[0.5, 0.5]]])).view(1, 2, 2)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert torch.isfinite(topk_divergence(student, teacher_ids, teacher_lps, torch.ones(1, 2, dtype=torch.bool),
                                              kind))


def test_mix_and_bad_arguments():
    ce, kd = torch.tensor(2.0), torch.tensor(4.0)
    assert distill_loss(ce, kd, 0.25).item() == pytest.approx(2.5)
    assert distill_loss(ce, kd, 0.0).item() == 2.0 and distill_loss(ce, kd, 1.0).item() == 4.0
    with pytest.raises(ValueError, match="kd_weight"):
        distill_loss(ce, kd, 1.5)
    with pytest.raises(ValueError, match="beta"):
        topk_divergence(torch.zeros(1, 1, 3), torch.zeros(1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1),
                        torch.ones(1, 1, dtype=torch.bool), "jsd", beta=1.0)


def test_sampled_token_loss_matches_reference_and_its_expected_gradient_is_the_reverse_kl(logits):
    student, teacher = logits
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    teacher_lp = F.log_softmax(teacher, -1).gather(-1, tokens[..., None]).squeeze(-1)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    total, n = 0.0, 0
    for bi in range(B):
        for t in range(T):
            if mask[bi, t]:
                lq = math.log(torch.softmax(student[bi, t].double(), -1)[tokens[bi, t]].item())
                total, n = total - (teacher_lp[bi, t].item() - lq) * lq, n + 1
    assert sampled_token_loss(student, tokens, teacher_lp, mask).item() == pytest.approx(total / n, rel=1e-5)
    # every token weighted by the student's probability of sampling it: the gradient of the exact reverse KL
    s = student.clone().requires_grad_(True)
    q = torch.softmax(s, -1).detach()
    expected_grad = torch.zeros_like(s)
    for x in range(V):
        xs = torch.full((B, T), x)
        lp = F.log_softmax(teacher, -1)[..., x]
        (g,) = torch.autograd.grad(sampled_token_loss(s, xs, lp, mask), s)
        expected_grad += q[..., x:x + 1] * g
    reverse_kl = (torch.softmax(s, -1) * (F.log_softmax(s, -1) - F.log_softmax(teacher, -1))).sum(-1)
    (exact,) = torch.autograd.grad((reverse_kl * mask).sum() / mask.sum(), s)
    assert torch.allclose(expected_grad, exact, atol=1e-5)
    assert sampled_token_loss(student, tokens, teacher_lp, torch.zeros(B, T, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_on_policy_loss_is_the_chosen_divergence_on_the_sampled_positions(logits, kind):
    # step.on_policy_loss shifts the batch (logits at t predict t + 1) and scores only the sampled positions
    from types import SimpleNamespace

    from backpack.student.step import on_policy_loss

    student, teacher = logits
    ids, vals = teacher_topk(teacher, 3)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    labels[:, :2] = IGNORE  # the prompt
    batch = {"input_ids": torch.zeros(B, T, dtype=torch.long), "attention_mask": torch.ones(B, T, dtype=torch.long),
             "labels": labels, "kd_ids": ids, "kd_logprobs": vals, "kd_mask": torch.ones(B, T, dtype=torch.bool)}
    model = lambda **_: SimpleNamespace(logits=student)  # noqa: E731 (the loss needs only the logits)
    value, m = on_policy_loss(model, batch, kind, beta=0.3)
    want = topk_divergence(student[:, :-1], ids[:, 1:], vals[:, 1:], labels[:, 1:] != IGNORE, kind, beta=0.3)
    assert float(value) == pytest.approx(float(want), rel=1e-6)
    assert m["tokens"] == int((labels[:, 1:] != IGNORE).sum())
