"""A student version as a model directory that plain transformers (and vLLM) load with no Backpack import:
LoRA merged into the base, a layer-subset student a normal model of its depth, with its tokenizer, chat
template, generation config and a model card naming its lineage. The round trip (the saved files loaded in a
fresh process, the same greedy answers) is backpack/run/export.py's."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def save_hf(model, tokenizer, out: Path, card: str) -> list[str]:
    """Write the merged model (safetensors), its generation config, the tokenizer (with its chat template) and
    the model card into `out`; returns the file names."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(card)
    return sorted(p.name for p in out.iterdir())


def model_card(run: str, version: int, meta: Optional[dict], lineage: dict) -> str:
    """The README of an exported version: what it is and where it came from."""
    student = (meta or {}).get("student") or lineage.get("student") or {}
    lines = [
        "---", "library_name: transformers", "tags: [backpack, distillation]", "---", "",
        f"# {run} v{version}", "",
        f"A student model distilled with Backpack (run `{run}`, version {version}"
        + (f", optimizer step {meta['step']}" if meta and meta.get("step") is not None else ", the untrained base")
        + "). It loads with plain transformers:", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH)", "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "```", "", "## Lineage", "",
        f"- base model: `{student.get('base')}`"
        + (f", layers {student['layers']}" if student.get("layers") is not None else ""),
        f"- training: mode {student.get('mode')}"
        + (f" (LoRA r={student.get('lora_r')}, merged into the base)" if student.get("mode") == "lora" else ""),
        f"- teachers: {', '.join(lineage.get('teachers') or []) or 'unknown'}",
        f"- dataset version: {(meta or {}).get('dataset_version')}",
    ]
    recipe = lineage.get("training") or {}
    if recipe:
        lines.append("- recipe: " + ", ".join(f"{k} {v}" for k, v in recipe.items()))
    figures = lineage.get("eval") or {}
    if figures:
        lines += ["", "## Evaluation (held-out prompts, against the teacher)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in figures.items()]
    lines += ["", "Exported by `backpack export`; Backpack: neural backpacking of small students from teachers.", ""]
    return "\n".join(lines)
