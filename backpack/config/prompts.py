"""What a run asks: its prompt collection, and how teachers decode each prompt."""

from __future__ import annotations

from typing import Optional

from pydantic import Field, model_validator

from backpack.config.base import Section
from backpack.core.types import DecodingParams


class PromptsConfig(Section):
    """The prompt collection of a run (for a continual run: the prompts pushed to its intake first)."""

    path: str = Field(description="a JSONL or Parquet prompt collection (docs/reference/formats.md)")
    limit: Optional[int] = Field(None, ge=1, description="use only the first N prompts")
    default_task: str = Field("default", description="task name of prompts that name none")
    max_chars: int = Field(32_000, ge=1, description="longer prompts are recorded as failed, not sent")


class DecodingConfig(Section):
    """How teachers decode each prompt (a prompt record may override any of these for itself)."""

    max_new_tokens: int = Field(64, ge=1, le=32_768, description="most tokens of an answer")
    temperature: float = Field(0.0, ge=0, le=10, description="0: greedy decoding")
    top_k: int = Field(0, ge=0, description="sample among the k likeliest tokens (0: off)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling's probability mass (1: off)")
    repetition_penalty: float = Field(1.0, gt=0, description="1: off")
    n: int = Field(1, ge=1, le=64, description="answers per prompt (needs sampling)")
    seed: Optional[int] = Field(None, ge=0, description="fixes sampling, so a prompt's answers are reproducible")
    logprobs: int = Field(0, ge=0, le=64, description="top-k logprobs stored per generated token (0: off)")

    @model_validator(mode="after")
    def _greedy_one_sample(self):
        if self.temperature == 0 and self.n > 1:
            raise ValueError("n > 1 needs sampling (temperature > 0): greedy decoding gives n identical answers")
        return self

    def params(self) -> DecodingParams:
        return DecodingParams(**self.model_dump())
