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
    # One record's own "decoding" may not ask for more than these (a pushed prompt could otherwise multiply a
    # paid teacher's bill or run a teacher out of memory); over them it is refused, naming the field.
    override_max_new_tokens: Optional[int] = Field(None, ge=1, le=32_768, description=(
        "most max_new_tokens a record's own decoding may ask for (null: the run's decoding.max_new_tokens)"))
    override_max_n: Optional[int] = Field(None, ge=1, le=64, description=(
        "most answers (n) a record's own decoding may ask for (null: the run's decoding.n)"))
    override_max_logprobs: Optional[int] = Field(None, ge=0, le=64, description=(
        "most top-k logprobs a record's own decoding may ask for (null: the run's decoding.logprobs)"))

    def override_caps(self, decoding: "DecodingConfig") -> dict[str, int]:
        """The most each decoding field may be set to by a record's own `decoding`."""
        return {"max_new_tokens": self.override_max_new_tokens or decoding.max_new_tokens,
                "n": self.override_max_n or decoding.n,
                "logprobs": decoding.logprobs if self.override_max_logprobs is None else self.override_max_logprobs}


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
