"""The vocabulary types: decoding parameters, Query and Completion.

These are in-process value types. Between actors they travel as Arrow tables (see `schema.py`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Optional

OK = "ok"
FAILED = "failed"

# finish reasons
STOP = "stop"      # the model produced its end-of-turn token
LENGTH = "length"  # max_new_tokens was reached
ERROR = "error"    # no text: the query failed (see Completion.error)


@dataclass(frozen=True)
class DecodingParams:
    """How a teacher decodes one Query. `temperature == 0` means greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0               # 0 = no top-k filtering
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    n: int = 1                   # number of samples per Query
    seed: Optional[int] = None   # fixes sampling for reproducible answers
    logprobs: int = 0            # store the top-k logprobs of each generated token (0 = off)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def key(self) -> str:
        """A stable string for grouping Queries that can share one generate call."""
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class Query:
    """One prompt: chat messages, a task name, decoding parameters and a stable id."""

    messages: list[dict]
    decoding: DecodingParams = field(default_factory=DecodingParams)
    task: str = "default"
    id: str = ""
    teacher: Optional[str] = None  # route only to this teacher (None = any)
    # Filled by recall (the Mental Process) before the Query reaches a teacher: the task knowledge put in front
    # of the prompt, the ids of the items it holds and the knowledge version. Not part of the id: the prompt
    # is the same prompt whatever knowledge answered it.
    context: Optional[str] = None
    recalled_ids: list[str] = field(default_factory=list)
    knowledge_version: Optional[int] = None
    # A completion someone else wrote (token ids in the teacher's tokenizer) for the teacher to score instead of
    # writing one: on-policy distillation sends the student's samples. The Completion carries these ids with
    # the teacher's logprob of each and its top-k (`decoding.logprobs` of them). Part of the id.
    score_ids: Optional[list[int]] = None
    student_version: Optional[int] = None  # the student version that wrote score_ids (None: not a student's)

    def __post_init__(self):
        if not self.id:
            self.id = query_id(self.messages, self.task, self.decoding, self.teacher, self.score_ids)

    @property
    def scoring(self) -> bool:
        """Whether the teacher scores `score_ids` (else it writes an answer)."""
        return self.score_ids is not None


def query_id(messages: list[dict], task: str, decoding: DecodingParams, teacher: Optional[str] = None,
             score_ids: Optional[list[int]] = None) -> str:
    """A content hash, so the same prompt with the same decoding gets the same id across runs (resume); a
    completion to score is part of it (the ids of prompts to answer are as they always were)."""
    parts = [messages, task, asdict(decoding), teacher] + ([list(score_ids)] if score_ids is not None else [])
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return "q" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


@dataclass
class Completion:
    """A teacher's answer to a Query (one per sample), or a record that the Query failed."""

    query_id: str
    teacher: str
    status: str = OK
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = STOP
    error: Optional[str] = None
    sample_index: int = 0
    replica: str = ""
    model_fingerprint: str = ""
    prompt_tokens: int = 0
    latency_s: float = 0.0
    # per generated token: logprob of the chosen token, and the top-k ids / logprobs (empty when not asked)
    token_logprobs: list[float] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)
    # tokens generated, when the teacher reports it without token ids (a remote endpoint); else len(token_ids)
    completion_tokens: Optional[int] = None

    @property
    def tokens_generated(self) -> int:
        """Tokens of the answer: what the teacher reported, else its token ids."""
        return len(self.token_ids) if self.completion_tokens is None else self.completion_tokens

    @classmethod
    def failed(cls, query_id: str, teacher: str, error: str, replica: str = "") -> "Completion":
        return cls(query_id=query_id, teacher=teacher, status=FAILED, finish_reason=ERROR, error=error,
                   replica=replica)
