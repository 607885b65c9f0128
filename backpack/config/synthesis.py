"""`synthesis:`: the teachers write new prompts (`backpack synthesize`), then curation keeps the good ones."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from backpack.config.base import Section


class SynthesisFilters(Section):
    """What a synthesized prompt must satisfy to be kept (backpack/data/curation.py; every removed prompt is kept in
    the rejected table with its reason)."""

    min_chars: int = Field(12, ge=1, description="shorter prompts are rejected (format)")
    max_chars: int = Field(1000, ge=1, description="longer prompts are rejected (format)")
    near_threshold: float = Field(0.6, gt=0, le=1, description=(
        "MinHash Jaccard over character 5-grams at which two prompts are near-duplicates (of a kept prompt, a "
        "seed or a held-out prompt)"))
    min_judge_score: Optional[float] = Field(None, ge=1, le=10, description=(
        "with synthesis.judge: prompts the judge scores below this (1-10: clear, self-contained, useful) are "
        "rejected; null: no judge filter"))

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars {self.min_chars} is over max_chars {self.max_chars}")
        return self


class SynthesisConfig(Section):
    """Where new prompts come from, and how many to keep. `seeds`: Self-Instruct, each request shows a few sampled
    seeds and a few prompts already kept and asks a teacher for new, different ones. `pack`: each request shows
    one passage or experience of a knowledge pack (two, for combined questions) and asks for questions it
    answers, in a style that changes on each pass over the pack. `failures`: as seeds, the seeds being the
    prompts a student version did worst on, and the request asking for new ones on the same topics. Rounds go on
    until `target` prompts are kept."""

    source: Literal["seeds", "pack", "failures"] = Field("seeds", description=(
        "where new prompts come from: seeds (a seed prompt file), pack (a knowledge pack's passages) or failures "
        "(the prompts a student version of this run did worst on, judged or fact-scored)"))
    seeds: Optional[str] = Field(None, description=(
        "source seeds: the seed tasks, a prompt file (JSONL or Parquet, the prompt-file format)"))
    pack: Optional[str] = Field(None, description=(
        "source pack: the knowledge pack (YAML, JSON or JSONL); null: the run's mental.path"))
    failures_version: Optional[int] = Field(None, ge=0, description=(
        "source failures: the student version whose weak prompts are shown (0: the base student; null: the "
        "newest judged or fact-scored one)"))
    failures_count: int = Field(20, ge=1, le=10_000, description=(
        "source failures: how many of its weakest prompts are sampled from (worst first)"))
    seed_limit: Optional[int] = Field(None, ge=1, description="use only the first N seeds")
    target: int = Field(100, ge=1, description="prompts to keep")
    max_target: int = Field(10_000, ge=1, description="the most `target` may ask for (a guard against a typo's bill)")
    rounds: int = Field(20, ge=1, description="most rounds of requests (each round sees the prompts kept before it)")
    requests_per_round: int = Field(16, ge=1, le=4096, description="requests sent to the teachers per round")
    per_request: int = Field(8, ge=1, le=64, description="new prompts asked for in each request")
    seeds_shown: int = Field(3, ge=1, le=16, description=(
        "source seeds or failures: seed (or weak) prompts shown in each request"))
    generated_shown: int = Field(2, ge=0, le=16, description=(
        "source seeds or failures: already kept prompts shown in each request"))
    evolve_fraction: float = Field(0.0, ge=0, lt=1, description=(
        "source seeds or failures: the share of each round's requests that rewrite a kept prompt (Evol-Instruct) instead of "
        "asking for new ones"))
    evolutions: list[Literal["deepen", "concretize", "constrain"]] = Field(
        default_factory=lambda: ["deepen", "concretize", "constrain"], min_length=1,
        description="the rewrites Evol-Instruct requests cycle through")
    teacher: Optional[str] = Field(None, description="the teacher that writes (null: the scheduler routes)")
    judge: Optional[str] = Field(None, description=(
        "a teacher of the run that scores each candidate passing the other filters from 1 to 10 (with "
        "filters.min_judge_score); null: no judge"))
    temperature: float = Field(0.9, gt=0, le=2, description="sampling temperature of the writing teacher")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling of the writing teacher")
    max_new_tokens: int = Field(256, ge=16, le=8192, description="most tokens of one request's reply")
    seed: int = Field(0, ge=0, description="seeds the choice of examples shown and the teachers' sampling")
    heldout: Optional[str] = Field(None, description=(
        "a prompt file whose prompts must not appear in the synthesized set (evaluation prompts: near-duplicates "
        "of them are rejected as leaks)"))
    filters: SynthesisFilters = Field(default_factory=SynthesisFilters, description="what a kept prompt satisfies")

    @model_validator(mode="after")
    def _source_given(self):
        if self.source == "seeds" and not self.seeds:
            raise ValueError("source is seeds but no seeds file is given (synthesis.seeds: a prompt file)")
        return self

    @model_validator(mode="after")
    def _judge_and_threshold_together(self):
        if (self.judge is None) != (self.filters.min_judge_score is None):
            raise ValueError("synthesis.judge and synthesis.filters.min_judge_score go together: the judge's scores "
                             "are only used against the threshold (set both, or neither)")
        return self

    @model_validator(mode="after")
    def _target_within_limit(self):
        if self.target > self.max_target:
            raise ValueError(f"target {self.target} is over max_target {self.max_target} (raise max_target if "
                             "you mean it)")
        return self
