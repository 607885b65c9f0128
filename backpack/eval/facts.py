"""Fact accuracy: does an answer state the reference facts of a question? Pure, no model.

A questions file is JSONL, one question a line:

    {"id": "q-01", "task": "support", "question": "How long do refunds take?", "facts": ["45 days"]}

`facts` lists what a correct answer must state; a fact may be a list of acceptable spellings
(`[["1,490 euros", "1490 euros"]]`). `id` (default: the line number), `task` (default: the run's
prompts.default_task) and `passage` (the id of the passage that answers it: a label for measuring recall) are
optional. A fact is found when its normalised text occurs in the normalised answer at word boundaries
(case, punctuation and thousands separators do not matter); a question scores the share of its facts found.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from backpack.errors import InputError

_FIELDS = {"id", "task", "question", "facts", "passage"}


@dataclass(frozen=True)
class Question:
    id: str
    task: str
    question: str
    facts: tuple[tuple[str, ...], ...]   # each fact: its acceptable spellings
    passage: Optional[str] = None


def normalise(text: str) -> str:
    """Lower case, thousands separators dropped (1,490 -> 1490), every other non-word character a space."""
    text = re.sub(r"(?<=\d)[,.\u202f'](?=\d{3}(?!\d))", "", text.lower())
    return " ".join(re.findall(r"[^\W_]+(?:[.,]\d+)?|[€$£%]", text))


def fact_found(answer: str, spellings: tuple[str, ...]) -> bool:
    padded = f" {normalise(answer)} "
    return any(f" {normalise(s)} " in padded for s in spellings if normalise(s))


def score(answer: str, facts: tuple[tuple[str, ...], ...]) -> float:
    """The share of `facts` the answer states (0..1)."""
    return sum(fact_found(answer, f) for f in facts) / len(facts) if facts else 0.0


def parse_question(rec, where: str, default_task: str) -> Question:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object")
    unknown = set(rec) - _FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} (allowed: {sorted(_FIELDS)})")
    q = rec.get("question")
    if not isinstance(q, str) or not q.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string")
    facts = rec.get("facts")
    if not isinstance(facts, list) or not facts:
        raise ValueError(f"{where}: 'facts' must be a non-empty list of reference facts")
    out = []
    for j, f in enumerate(facts):
        spellings = [f] if isinstance(f, str) else f
        if (not isinstance(spellings, list) or not spellings
                or not all(isinstance(s, str) and normalise(s) for s in spellings)):
            raise ValueError(f"{where}: facts[{j}] must be a non-empty string or a list of them")
        out.append(tuple(spellings))
    return Question(id=str(rec.get("id") or where), task=str(rec.get("task") or default_task), question=q,
                    facts=tuple(out), passage=rec.get("passage"))


def load_questions(path: str | Path, default_task: str = "default") -> list[Question]:
    """Every question of a JSONL file; InputError listing each bad line (up to 10)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"questions file not found: {str(path)!r}")
    out, problems, ids = [], [], set()
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            q = parse_question(json.loads(line), where, default_task)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not JSON ({e.msg})")
            continue
        except ValueError as e:
            problems.append(str(e))
            continue
        if q.id in ids:
            problems.append(f"{where}: duplicate id {q.id!r}")
        ids.add(q.id)
        out.append(q)
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise InputError("bad questions file:\n  " + "\n  ".join(problems[:10]) + more)
    if not out:
        raise InputError(f"questions file {str(path)!r} has no questions")
    return out
