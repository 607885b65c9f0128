"""Dataset rows -> training tensors -> loss, on rows a real (tiny) teacher generated with logprobs."""

import pytest
import torch

from backpack.config import StudentConfig, TeacherConfig
from backpack.core.losses import IGNORE
from backpack.core.schema import queries_to_table
from backpack.core.types import DecodingParams, Query
from backpack.student.autopilot import load_student
from backpack.student.examples import build_examples, collate
from backpack.student.step import student_loss
from backpack.teachers.hf import HFTeacher

K = 4


@pytest.fixture(scope="module")
def rows(tiny_model_dir):
    teacher = HFTeacher(TeacherConfig(name="tiny", model=tiny_model_dir))
    qs = [Query(messages=[{"role": "user", "content": p}], decoding=DecodingParams(max_new_tokens=12, logprobs=K))
          for p in ["one", "two words", "three words here"]]
    return teacher.generate(queries_to_table(qs)).to_pylist()


def test_prompt_masked_answer_labelled_and_kd_aligned(rows, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    bad = dict(rows[0], status="failed")
    examples, stats = build_examples(rows + [bad], tok, max_len=256, same_tokenizer=True, use_logprobs=True)
    assert (stats.used, stats.failed_rows, stats.truncated) == (3, 1, 0)
    for ex, row in zip(examples, rows):
        n_prompt = sum(1 for lab in ex.labels if lab == IGNORE)
        answer = ex.labels[n_prompt:]
        expected = row["token_ids"] + ([tok.eos_token_id] if row["finish_reason"] == "stop" else [])
        assert answer == expected and ex.input_ids[n_prompt:] == expected
        assert all(lab == IGNORE for lab in ex.labels[:n_prompt])
        for j, ids in enumerate(row["top_ids"]):
            assert ex.kd_ids[n_prompt + j] == ids
        assert ex.kd_ids[0] == []


def test_truncation_and_too_long_prompts_are_counted(rows, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt_len = min(len(build_examples([r], tok, 512, True, False)[0][0].labels) - len(r["token_ids"]) - 1
                     for r in rows)
    examples, stats = build_examples(rows, tok, max_len=prompt_len + 2, same_tokenizer=True, use_logprobs=False)
    assert stats.truncated + stats.too_long_prompt == 3 and stats.truncated >= 1
    assert all(len(e.input_ids) <= prompt_len + 2 for e in examples)
    _, stats = build_examples(rows, tok, max_len=5, same_tokenizer=True, use_logprobs=False)
    assert stats.too_long_prompt == 3 and stats.used == 0


def test_collate_pads_and_masks(rows, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples, _ = build_examples(rows, tok, 256, True, True)
    batch = collate(examples, tok.pad_token_id, top_k=K)
    lengths = [len(e.input_ids) for e in examples]
    assert batch["input_ids"].shape == (3, max(lengths)) and batch["kd_ids"].shape == (3, max(lengths), K)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["kd_mask"].sum().item() == sum(len(r["top_ids"]) for r in rows)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_student_identical_to_teacher_has_near_zero_kd(rows, tiny_model_dir):
    student = load_student(StudentConfig(base=tiny_model_dir, mode="full"))
    examples, _ = build_examples(rows, student.tokenizer, 256, True, True)
    batch = collate(examples, student.tokenizer.pad_token_id, top_k=K)
    with torch.no_grad():
        _, m = student_loss(student.model, batch, kd_weight=1.0)
    assert m["kd"] < 1e-4 and m["ce"] > 0 and m["tokens"] == sum(len(e.labels) - e.labels.count(IGNORE)
                                                                 for e in examples)


def _train(student, rows, kd_weight, steps, lr):
    examples, _ = build_examples(rows, student.tokenizer, 256, True, True)
    batch = collate(examples, student.tokenizer.pad_token_id, top_k=K)
    opt = torch.optim.AdamW([p for p in student.model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = student_loss(student.model, batch, kd_weight=kd_weight)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


@pytest.mark.parametrize("kd_weight", [0.0, 0.5, 1.0])
def test_full_training_steps_lower_the_loss(rows, tiny_model_dir, kd_weight):
    torch.manual_seed(0)
    student = load_student(StudentConfig(base=tiny_model_dir, mode="full"))
    for p in student.model.parameters():  # start away from the teacher so KD has something to learn
        p.data.add_(torch.randn_like(p) * 0.05)
    losses = _train(student, rows, kd_weight, steps=10, lr=1e-2)
    assert losses[-1] < losses[0] * 0.8


def test_lora_on_the_default_student_learns_teacher_answers(rows, smol_dir):
    torch.manual_seed(0)
    student = load_student(StudentConfig(lora_r=8, lora_alpha=16, lora_dropout=0.0))
    losses = _train(student, rows, kd_weight=0.0, steps=8, lr=5e-3)
    assert losses[-1] < losses[0] * 0.8
