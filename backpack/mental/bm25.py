"""The self-taking mechanism's pure core (the Mental Process): rank a task's knowledge for a prompt (BM25) and pack the best of it
into a token budget. No Redis, no model: the caller gives the items and a token counter.

BM25 (Okapi, k1=1.5, b=0.75) over lower-cased word tokens: it needs no model (there is no hub access on a
laptop without internet), is exact on the rare names a knowledge pack is about (product names, policy
numbers), and is cheap enough to run for every prompt in the scheduler.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from backpack.config.knowledge import Item

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
# Words too common to say anything about relevance (a short English list; BM25's idf discounts the rest).
_STOP = frozenset("a an and are as at be by can do does for from has have how i if in is it its my of on or our "
                  "so that the their there this to was we what when where which who why will with you your".split())


def words(text: str) -> list[str]:
    """Lower-cased word tokens without stop words (numbers kept: "plan 3" and "30 days" matter)."""
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


class BM25:
    """An Okapi BM25 index over items' `key` texts."""

    def __init__(self, items: Sequence[Item], k1: float = 1.5, b: float = 0.75):
        self.items, self.k1, self.b = list(items), k1, b
        self.docs = [Counter(words(it.key)) for it in self.items]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.avg = (sum(self.lengths) / len(self.lengths)) if self.lengths else 0.0
        df = Counter(w for d in self.docs for w in d)
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}

    def scores(self, query: str) -> list[float]:
        """The BM25 score of every item for `query` (0 for items sharing no word with it)."""
        q = Counter(words(query))
        out = []
        for d, length in zip(self.docs, self.lengths):
            s = 0.0
            norm = self.k1 * (1 - self.b + self.b * length / self.avg) if self.avg else self.k1
            for w, qf in q.items():
                f = d.get(w)
                if f:
                    s += self.idf[w] * f * (self.k1 + 1) / (f + norm) * qf
            out.append(s)
        return out

    def rank(self, query: str) -> list[tuple[Item, float]]:
        """Items with a positive score, best first (ties keep the items' order)."""
        scored = [(it, s) for it, s in zip(self.items, self.scores(query)) if s > 0]
        return sorted(scored, key=lambda p: -p[1])


@dataclass
class Recalled:
    """What recall puts in front of a prompt, and what it chose."""
    context: str = ""
    passage_ids: list[str] = field(default_factory=list)
    experience_ids: list[str] = field(default_factory=list)
    tokens: int = 0

    @property
    def ids(self) -> list[str]:
        """Every recalled item's id: passages, then experiences (what a dataset row records)."""
        return self.passage_ids + self.experience_ids


def pack_context(persona: str, ranked: Sequence[Item], budget: int, count: Callable[[str], int],
                 max_items: int = 8) -> Recalled:
    """The persona, then the best-ranked items that fit, as one context text of at most `budget` tokens by
    `count` (checked on the joined text: never over the budget). An item that does not fit is skipped and
    smaller later ones may still fit. A persona larger than the budget is left out (only items are packed)."""
    head = [persona] if persona and count(persona) <= budget else []
    chosen: list[Item] = []
    used = count(persona) if head else 0
    for it in ranked:
        if len(chosen) >= max_items:
            break
        n = count(it.text) + (1 if head or chosen else 0)  # + the blank line joining it
        if used + n <= budget:
            chosen.append(it)
            used += n

    def joined() -> str:
        return "\n\n".join(head + [it.text for it in chosen])

    # A tokenizer may count the joined text higher than its parts: drop from the end until it fits.
    while chosen and count(joined()) > budget:
        chosen.pop()
    context = joined()
    return Recalled(context=context, passage_ids=[it.id for it in chosen if it.kind == "passage"],
                    experience_ids=[it.id for it in chosen if it.kind == "experience"],
                    tokens=count(context) if context else 0)

