"""The Autopilot: a student's pretrained base, frozen, with trainable LoRA adapters on top (or, as a switch,
trained in full). A student can be made smaller than its teacher by keeping a subset of the base's decoder
layers (DistilBERT's every-other-layer initialisation); such a student is trained in full.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from backpack.config import StudentConfig
from backpack.errors import InputError
from backpack.teachers.loader import ResolvedModel, resolve_model


@dataclass
class Autopilot:
    model: torch.nn.Module       # a transformers causal LM, or a peft model wrapping one
    tokenizer: object
    base: ResolvedModel
    layers: list[int]            # indices of the base's layers the student kept
    tokenizer_fingerprint: str

    def parameter_counts(self) -> tuple[int, int]:
        """(all parameters, trainable parameters)."""
        params = list(self.model.parameters())
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies a vocabulary: token-level KD is only meaningful between models that share it."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = json.dumps([vocab, tokenizer.eos_token, tokenizer.bos_token], ensure_ascii=False)
    return "tok-sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def decoder_layers(model) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise InputError(f"cannot select layers of a {type(model).__name__}: it has no model.layers list")
    return layers


def layer_indices(spec, total: int) -> list[int]:
    """The layer indices a `layers` spec keeps, validated against the base's `total` layers."""
    if spec is None:
        return list(range(total))
    if spec == "every_other":
        return list(range(0, total, 2))
    bad = [i for i in spec if not 0 <= i < total]
    if bad:
        raise InputError(f"student.layers: {bad} out of range (the base has {total} layers: 0..{total - 1})")
    if sorted(set(spec)) != list(spec):
        raise InputError(f"student.layers must be strictly increasing without repeats (got {spec})")
    return list(spec)


def keep_layers(model, keep: list[int]) -> None:
    """Keep only the decoder layers at `keep`, in place, renumbering them for the KV cache."""
    layers = decoder_layers(model)
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]


def check_target_modules(model, targets: list[str]) -> None:
    """Every LoRA target must name a Linear module of the model (by its last name component)."""
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in targets if t not in linear]
    if missing:
        raise InputError(f"student.target_modules: {missing} not in the model (its linear modules: "
                         f"{', '.join(sorted(linear))})")


def lora_config(cfg: StudentConfig):
    """peft's LoraConfig of the student's adapter variant."""
    from peft import LoraConfig

    # pissa's full SVD is deterministic, so a version reloads onto the same residual base it was trained on
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM",
                      use_dora=cfg.adapter == "dora", use_rslora=cfg.adapter == "rslora",
                      init_lora_weights="pissa" if cfg.adapter == "pissa" else True)


def load_student(cfg: StudentConfig, device: str = "cpu") -> Autopilot:
    """Load the student's base and make it trainable as the config says."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = resolve_model(cfg.base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base.path)
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot load student base {cfg.base!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    keep = layer_indices(cfg.layers, len(decoder_layers(model)))
    if cfg.layers is not None:
        keep_layers(model, keep)
    if cfg.mode == "lora":
        from peft import get_peft_model

        check_target_modules(model, cfg.target_modules)
        model = get_peft_model(model, lora_config(cfg))  # freezes the base, adds trainable adapters
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.to(device)
    return Autopilot(model, tokenizer, base, keep, tokenizer_fingerprint(tokenizer))
