"""How the scheduler routes prompts to teacher replicas, batches and stores their answers."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from backpack.config.base import Section


class EnsembleConfig(Section):
    """scheduler.policy ensemble: each prompt goes to several teachers (see backpack/scheduling/ensemble.py)."""

    teachers: int | list[str] = Field(2, description=(
        "k (>= 2): the first k teachers in config order that have a live replica; or the teachers to ask, by name "
        "(their order is the order of keep: first)"))
    keep: Literal["all", "first", "longest", "agreement", "logprob"] = Field("all", description=(
        "all: every teacher's answer, each row naming its teacher. Or one teacher's answer per prompt: first (in "
        "the order asked), longest, agreement (most like the others, by chrF; 3+ teachers), logprob (highest "
        "mean token logprob; needs decoding.logprobs >= 1)"))

    @field_validator("teachers")
    @classmethod
    def _two_or_more(cls, v):
        if isinstance(v, int) and v < 2:
            raise ValueError(f"an ensemble asks 2 teachers or more (got {v})")
        if isinstance(v, list) and (len(v) < 2 or len(set(v)) < len(v)):
            raise ValueError(f"an ensemble names 2 different teachers or more (got {v})")
        return v

    @model_validator(mode="after")
    def _agreement_needs_three(self):
        if self.keep == "agreement" and self.size() < 3:
            raise ValueError("keep 'agreement' picks the answer most like the others: it needs 3 teachers or more "
                             "(with 2, each answer is as like the other: use first or longest)")
        return self

    def size(self) -> int:
        return self.teachers if isinstance(self.teachers, int) else len(self.teachers)


class SchedulerConfig(Section):
    """The query scheduler: routing, retries, shards, backpressure."""

    policy: Literal["round_robin", "least_loaded", "by_task", "cheapest", "fallback", "ensemble"] = Field(
        "round_robin", description=(
            "round_robin | least_loaded | by_task (teachers[].tags) | cheapest (cost_per_1k_tokens) | fallback "
            "(config order: the next teacher only when the ones before are dead or failed the batch) | ensemble "
            "(each prompt to several teachers, the answers kept by scheduler.ensemble.keep)"))
    ensemble: Optional[EnsembleConfig] = Field(None, description=(
        "policy ensemble only (absent: its defaults, 2 teachers, keep all)"))
    max_retries: int = Field(2, ge=0, le=10, description="other replicas tried before a batch's Queries are failed")
    flush_rows: int = Field(64, ge=1, description="rows buffered before a Parquet shard is written")
    flush_seconds: float = Field(5.0, gt=0, le=3600, description=(
        "a shard is also written when its oldest buffered row is this old (continual runs: fresh data within "
        "seconds)"))
    max_pending: int = Field(256, ge=1, description=(
        "continual runs: at most this many prompts read from the intake stream and not yet stored (the rest waits "
        "in the stream: backpressure, nothing dropped); policy ensemble, any run: also at most this many prompts "
        "with some teachers' answers held, waiting for the others'"))

    def ensemble_settings(self) -> EnsembleConfig:
        """Policy ensemble's settings: the section as written, or its defaults when the config gives none."""
        return self.ensemble or EnsembleConfig()

    def answers_per_query(self) -> int:
        """How many teachers' rows each prompt gets (for a progress total): k for ensemble keep all, else 1."""
        e = self.ensemble_settings()
        return e.size() if self.policy == "ensemble" and e.keep == "all" else 1
