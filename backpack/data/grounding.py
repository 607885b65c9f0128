"""Is a teacher's answer grounded in the context it was given? Pure, no model.

A small teacher with the right passage in its prompt still invents: a price that is not in the passage, a
founder from nowhere. A student trained on such answers learns the inventions as firmly as the facts, so
context distillation can keep only the answers whose specific claims all come from the recalled context.

The claims of an answer are its numbers (thousands separators dropped: 1,490 = 1490) and its names (words
written with a capital letter that do not begin a sentence). An answer is grounded when every claim occurs in
the context and it makes at least one: an answer that states nothing specific teaches no knowledge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
_WORD = re.compile(r"[^\W\d_][\w'-]*")
_SENTENCE = re.compile(r"(?<=[.!?:;])\s+|\n+")


def _number(text: str) -> str:
    """1,490 -> 1490 (a comma between digit groups of three is a thousands separator); 4.5 and 9:30 stay."""
    return re.sub(r",(?=\d{3}(?!\d))", "", text)


def claims(text: str) -> tuple[set[str], set[str]]:
    """(numbers, lower-cased names) an answer states."""
    numbers = {_number(m).rstrip(".,:") for m in _NUMBER.findall(text)}
    names = set()
    for sentence in _SENTENCE.split(text):
        words = _WORD.findall(sentence)
        names.update(w.lower() for w in words[1:] if w[0].isupper() and w != "I")
    return numbers, names


@dataclass(frozen=True)
class Grounding:
    supported: int            # claims found in the context
    unsupported: tuple        # claims that are not (sorted)

    @property
    def grounded(self) -> bool:
        return self.supported > 0 and not self.unsupported


def grounding(answer: str, context: str) -> Grounding:
    """How far `answer`'s claims come from `context` (recalled passages, persona, experiences)."""
    numbers, names = claims(answer)
    ctx_numbers = {_number(m).rstrip(".,:") for m in _NUMBER.findall(context)}
    ctx_words = {w.lower() for w in _WORD.findall(context)}
    ok = (numbers & ctx_numbers) | (names & ctx_words)
    return Grounding(len(ok), tuple(sorted((numbers - ctx_numbers) | (names - ctx_words))))


def keep_for_training(answer: str, context) -> bool:
    """The grounded-only rule for one dataset row: rows made without context (nothing recalled) are kept as they
    are; rows made with context are kept when their answer is grounded in it."""
    return not context or grounding(answer or "", context).grounded
