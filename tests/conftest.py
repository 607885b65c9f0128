"""Shared fixtures. Ray is started once per test session (ray.init costs 5-10 s) and only by tests that ask
for `ray_session`; the real default model is converted from its GGUF once and cached."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="session")
def smol_dir() -> str:
    """The default SmolLM2-135M-Instruct model as a safetensors directory (converted once, then cached)."""
    from backpack.teachers.loader import resolve_model

    return resolve_model("default").path


@pytest.fixture(scope="session")
def tiny_model_dir(smol_dir, tmp_path_factory) -> str:
    """A tiny randomly initialised Llama with the SmolLM2 tokenizer, saved as a normal HF directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(smol_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, namespace="backpack-tests", log_to_driver=False,
                 logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture
def redis_server(tmp_path):
    from backpack.runtime.redis_server import EmbeddedRedis

    with EmbeddedRedis(tmp_path / "redis") as server:
        yield server


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, input: str | None = None):
    """Run `python -m backpack.cli ARGS` in a subprocess (`input`: its stdin); returns CompletedProcess (text)."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "backpack.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO, input=input)
