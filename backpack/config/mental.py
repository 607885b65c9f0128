"""What task knowledge a run's teachers recall (the Mental Process), and what the student trains on."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from backpack.config.base import Section


class MentalConfig(Section):
    """The Mental Process: each task's knowledge, recalled in front of the teacher's prompt (the dataset keeps
    the prompt without it, so the student learns to answer without it: context distillation)."""

    path: Optional[str] = Field(None, description=(
        "a knowledge pack (YAML, JSON or JSONL) imported into the run's store at start (a new knowledge version "
        "only when its content changed); null: use what the store holds (`backpack mental import/add`)"))
    budget: int = Field(256, ge=16, le=32_768, description=(
        "most tokens of recalled context per prompt (the first local teacher's tokenizer)"))
    max_items: int = Field(4, ge=0, le=64, description="most passages + experiences recalled per prompt")
    student_recall: bool = Field(False, description=(
        "serve the student with recall too (a retrieval-augmented student, for comparison with the distilled one)"))
    train_on: Literal["all", "grounded"] = Field("all", description=(
        "which answers made with recall the student trains on: all, or grounded (only those whose numbers and "
        "names all occur in the recalled context); rows made without context are always kept"))
