"""The Autopilot: LoRA on a frozen base, full fine-tuning, layer-subset students, clear errors."""

import pytest
import torch

from backpack.config import StudentConfig
from backpack.errors import InputError
from backpack.student.autopilot import layer_indices, load_student, tokenizer_fingerprint


def test_lora_freezes_the_base_and_trains_adapters(tiny_model_dir):
    ap = load_student(StudentConfig(base=tiny_model_dir, lora_r=4))
    total, trainable = ap.parameter_counts()
    assert 0 < trainable < total * 0.2
    names = [n for n, p in ap.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    out = ap.model(input_ids=torch.tensor([[1, 2, 3]]))
    out.logits.sum().backward()
    assert all(p.grad is None for n, p in ap.model.named_parameters() if "lora_" not in n)


def test_full_mode_trains_everything(tiny_model_dir):
    ap = load_student(StudentConfig(base=tiny_model_dir, mode="full"))
    total, trainable = ap.parameter_counts()
    assert total == trainable


def test_every_other_layer_student_is_smaller_and_runs(smol_dir):
    ap = load_student(StudentConfig(mode="full", layers="every_other"))
    assert ap.layers == list(range(0, 30, 2)) and ap.model.config.num_hidden_layers == 15
    total, _ = ap.parameter_counts()
    assert total < 100e6  # SmolLM2-135M with half its layers
    ids = ap.tokenizer("Hello there", return_tensors="pt").input_ids
    out = ap.model.generate(ids, max_new_tokens=3, do_sample=False)  # the renumbered KV cache works
    assert out.shape[1] == ids.shape[1] + 3


def test_layer_specs_and_bad_input(tiny_model_dir):
    assert layer_indices([0, 3], 4) == [0, 3] and layer_indices(None, 2) == [0, 1]
    with pytest.raises(InputError, match="out of range"):
        layer_indices([0, 9], 4)
    with pytest.raises(InputError, match="strictly increasing"):
        layer_indices([2, 1], 4)
    with pytest.raises(InputError, match=r"student.target_modules: \['qkv'\] not in the model"):
        load_student(StudentConfig(base=tiny_model_dir, target_modules=["qkv"]))
    with pytest.raises(InputError, match="not found"):
        load_student(StudentConfig(base="/nonexistent/model.gguf"))
    with pytest.raises(ValueError, match="trained in full"):
        StudentConfig(layers="every_other")


def test_tokenizer_fingerprint_same_for_shared_vocab(smol_dir, tiny_model_dir):
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(smol_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    b.add_tokens(["<brand-new-token>"])
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
