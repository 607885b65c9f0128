"""How a run's student versions are scored against the teacher."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from backpack.config.base import Section


class EvalConfig(Section):
    """How student versions are scored against the teacher on held-out prompts."""

    heldout_fraction: float = Field(0.1, gt=0, lt=1, description=(
        "share of prompts never trained on, chosen by a hash of the prompt id (the same every run)"))
    max_rows: Optional[int] = Field(None, ge=1, description="evaluate on at most this many held-out rows")
    max_new_tokens: int = Field(64, ge=1, description="length of the student's greedy answers")
    batch_size: int = Field(8, ge=1, description="prompts per evaluation batch")
    every_version: bool = Field(True, description="false: only version 0 and the last version")
