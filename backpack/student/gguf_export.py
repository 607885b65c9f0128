"""A student version as one GGUF file (llama.cpp's format, also read by transformers' GGUF loader), written with
the maintained `gguf` package: the llama architecture's names and metadata, a byte-level BPE tokenizer, the
query and key projections permuted the way llama.cpp's rotary embedding expects (transformers' loader permutes
them back). Full precision (f32, f16) or quantised (q8_0, q4_0, q4_1); norms stay f32, as llama.cpp's own
converter keeps them. Other architectures and tokenizers are refused with a message, not written wrongly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from backpack.errors import InputError

QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_1")
LLAMA_LIKE = ("llama", "mistral")
_PER_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _qtype(quant: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
            "q4_1": gguf.GGMLQuantizationType.Q4_1}[quant]


def _file_type(quant: str):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
            "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[quant]


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a query or key projection from the halves layout of HF's rotary embedding to llama.cpp's
    interleaved one."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_exportable(model, tokenizer) -> None:
    kind = getattr(model.config, "model_type", None)
    if kind not in LLAMA_LIKE:
        raise InputError(f"--format gguf: a {kind!r} model cannot be written yet (llama-like models only: "
                         f"{', '.join(LLAMA_LIKE)}); export --format hf and convert with llama.cpp")
    spec = _tokenizer_json(tokenizer)
    if (spec.get("model") or {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise InputError("--format gguf: only byte-level BPE tokenizers (GPT-2 style) can be written yet")


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError("--format gguf: the student's tokenizer has no fast (tokenizer.json) form")
    return json.loads(backend.to_str())


def write_gguf(model, tokenizer, path: Path, quant: str, name: str) -> None:
    """Write `model` (a merged transformers causal LM) and its tokenizer to `path`."""
    import gguf

    check_exportable(model, tokenizer)
    c = model.config
    heads, kv_heads = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(c.max_position_embeddings)
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or (c.rope_parameters or {}).get("rope_theta")))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(_file_type(quant))
    _add_tokenizer(w, tokenizer, c.vocab_size)
    state = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
               "output_norm.weight": state["model.norm.weight"]}
    if not getattr(c, "tie_word_embeddings", False):
        tensors["output.weight"] = state["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        for hf, short in _PER_LAYER.items():
            t = state[f"model.layers.{i}.{hf}.weight"]
            if short == "attn_q":
                t = permute(t, heads)
            elif short == "attn_k":
                t = permute(t, kv_heads)
            tensors[f"blk.{i}.{short}.weight"] = t
    qtype = _qtype(quant)
    for tname, t in tensors.items():
        if t.ndim == 1 or quant == "f32":  # norms stay f32, as llama.cpp's converter keeps them
            w.add_tensor(tname, np.ascontiguousarray(t, dtype=np.float32))
        elif quant == "f16":
            w.add_tensor(tname, np.ascontiguousarray(t, dtype=np.float16))
        else:
            w.add_tensor(tname, gguf.quants.quantize(np.ascontiguousarray(t), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add_tokenizer(w, tokenizer, vocab_size: int) -> None:
    spec = _tokenizer_json(tokenizer)
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [3 if i in special else 1 if i in by_id else 5 for i in range(vocab_size)]  # control, normal, unused
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    # llama.cpp picks its pre-tokenizer regex by this name: SmolLM's, or its default for a vocabulary it is not
    w.add_tokenizer_pre("smollm" if _is_smollm(tokens) else "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for add, token_id in ((w.add_bos_token_id, tokenizer.bos_token_id), (w.add_eos_token_id, tokenizer.eos_token_id),
                          (w.add_pad_token_id, tokenizer.pad_token_id), (w.add_unk_token_id, tokenizer.unk_token_id)):
        if token_id is not None:
            add(token_id)
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    w.add_add_space_prefix(False)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


def _is_smollm(tokens: list[str]) -> bool:
    """SmolLM's vocabulary (the default model's): its first tokens are these specials."""
    return tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
