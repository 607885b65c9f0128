"""Curating synthesized prompts: nothing dropped silently.

A candidate prompt passes a fixed order of filters; the first one it fails is its reason, and it goes to the
rejected table with that reason (and, for a duplicate or a leak, the prompt it matches). The funnel is the count
left after each filter, so generated = kept + every rejected count, always.

Filters, in order:
  format      empty, too short or too long (characters), or not one line of instruction text (a list of several
              prompts pasted together, leftover numbering or markup)
  refusal     the teacher declined or commented instead of writing a prompt ("I'm sorry", "As an AI")
  question    not a request: no question mark and no instruction verb at its start
  exact       the same text (case, spacing and punctuation ignored) as a prompt kept before it
  seed        near-duplicate of a seed prompt (MinHash Jaccard over character 5-grams >= `near_threshold`)
  heldout     near-duplicate of a held-out evaluation prompt: would leak evaluation into training
  near        near-duplicate of a prompt kept before it
  judge       (optional) the judge's score below `min_judge_score`

Near-duplicates come from datasketch's MinHash LSH (candidates) confirmed by the MinHash Jaccard estimate, so
the cost stays linear in the number of prompts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

SHINGLE = 5  # characters: short prompts have too few word n-grams for a stable Jaccard estimate
NUM_PERM = 128

REFUSALS = re.compile(r"^\s*(i'?m sorry|i am sorry|sorry,|i can(?:no|')t|i cannot|as an ai|i apologi[sz]e|"
                      r"unfortunately|here (?:is|are) (?:a |some |the )?(?:new |few )?(?:prompt|instruction|"
                      r"question|task)s?\b)", re.I)
INSTRUCTION_VERBS = frozenset("""
    write explain describe list give name summarize summarise compare translate create suggest tell find
    calculate compute convert define design draft generate identify outline plan recommend rewrite solve sort
    classify continue correct estimate evaluate fix implement make paraphrase predict prove rank rephrase review
    show simplify state analyze analyse brainstorm build compose construct derive discuss edit explore imagine
    illustrate interpret offer provide propose share count choose pick determine can could would should how what
    why when where which who whom whose is are do does did will please
""".split())
_NUMBERING = re.compile(r"^\s*(?:\d+[.):]|[-*•]|#+|prompt\s*\d*:|instruction\s*\d*:|question\s*\d*:)\s*", re.I)
_NUMBERED_LINE = re.compile(r"^\s*(?:\d+[.):]|[-*•])\s+", re.M)
_NORMAL = re.compile(r"[^\w]+")


@dataclass(frozen=True)
class Filters:
    """What a kept prompt must satisfy (the `synthesis.filters` config section, validated there)."""

    min_chars: int = 12
    max_chars: int = 1000
    near_threshold: float = 0.6
    min_judge_score: Optional[float] = None


@dataclass
class Rejection:
    text: str
    reason: str                     # one of FILTERS
    duplicate_of: Optional[str]     # the kept, seed or held-out prompt it matches
    index: int                      # its position among the candidates


@dataclass
class Curated:
    kept: list[int]                 # indices of kept candidates, in their order
    texts: list[str]                # the kept prompts, cleaned (numbering stripped, spaces collapsed)
    rejected: list[Rejection]
    funnel: list[tuple[str, int]] = field(default_factory=list)  # (stage, prompts left after it)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rejected:
            out[r.reason] = out.get(r.reason, 0) + 1
        return out


FILTERS = ("format", "refusal", "question", "exact", "seed", "heldout", "near", "judge")


def clean(text: str) -> str:
    """A candidate as a prompt: leading numbering, bullets and quotes stripped, whitespace collapsed."""
    text = _NUMBERING.sub("", text.strip())
    text = text.strip().strip('"').strip("'").strip()
    return re.sub(r"\s+", " ", text)


def normal(text: str) -> str:
    """The form two prompts are compared in: lower case, words only."""
    return _NORMAL.sub(" ", text.lower()).strip()


def shingles(text: str) -> set[bytes]:
    t = normal(text)
    if len(t) <= SHINGLE:
        return {t.encode()}
    return {t[i:i + SHINGLE].encode() for i in range(len(t) - SHINGLE + 1)}


def minhash(text: str):
    from datasketch import MinHash

    m = MinHash(num_perm=NUM_PERM, seed=1)
    m.update_batch(list(shingles(text)))
    return m


class NearIndex:
    """Prompts indexed for near-duplicate look-up (MinHash LSH at `threshold`)."""

    def __init__(self, threshold: float):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self.hashes: dict[str, object] = {}
        self.texts: dict[str, str] = {}

    def add(self, key: str, text: str, mh=None) -> None:
        if key in self.hashes:
            return
        mh = mh if mh is not None else minhash(text)
        self.lsh.insert(key, mh)
        self.hashes[key], self.texts[key] = mh, text

    def match(self, mh) -> Optional[str]:
        """The indexed prompt most similar to `mh` at or above the threshold, or None."""
        best, best_sim = None, self.threshold
        for key in self.lsh.query(mh):
            sim = mh.jaccard(self.hashes[key])
            if sim >= best_sim:
                best, best_sim = key, sim
        return None if best is None else self.texts[best]


def _format_problem(text: str, raw: str, f: Filters) -> bool:
    if not text or len(text) < f.min_chars or len(text) > f.max_chars:
        return True
    several = len(_NUMBERED_LINE.findall(raw)) > 1  # a list of prompts pasted as one
    return several or text.count("?") > 3


def _is_request(text: str) -> bool:
    if "?" in text:
        return True
    first = normal(text).split(" ", 1)[0]
    return first in INSTRUCTION_VERBS


def curate(candidates: Sequence[str], seeds: Iterable[str] = (), heldout: Iterable[str] = (),
           filters: Filters = Filters(), judge_scores: Optional[Sequence[Optional[float]]] = None) -> Curated:
    """Filter `candidates` in order (see the module docstring); every one is kept or rejected with a reason."""
    seed_index, held_index, kept_index = (NearIndex(filters.near_threshold) for _ in range(3))
    for i, s in enumerate(seeds):
        seed_index.add(f"s{i}", s)
    for i, h in enumerate(heldout):
        held_index.add(f"h{i}", h)
    exact: dict[str, str] = {}
    kept, texts, rejected = [], [], []
    left = {name: 0 for name in FILTERS}

    def reject(i, text, reason, dup=None):
        rejected.append(Rejection(text, reason, dup, i))
        left[reason] += 1

    for i, raw in enumerate(candidates):
        text = clean(raw or "")
        if _format_problem(text, raw or "", filters):
            reject(i, raw or "", "format")
            continue
        if REFUSALS.match(text):
            reject(i, text, "refusal")
            continue
        if not _is_request(text):
            reject(i, text, "question")
            continue
        key = normal(text)
        if key in exact:
            reject(i, text, "exact", exact[key])
            continue
        mh = minhash(text)
        dup = seed_index.match(mh)
        if dup is not None:
            reject(i, text, "seed", dup)
            continue
        dup = held_index.match(mh)
        if dup is not None:
            reject(i, text, "heldout", dup)
            continue
        dup = kept_index.match(mh)
        if dup is not None:
            reject(i, text, "near", dup)
            continue
        score = judge_scores[i] if judge_scores is not None else None
        if filters.min_judge_score is not None and (score is None or score < filters.min_judge_score):
            reject(i, text, "judge")
            continue
        exact[key] = text
        kept_index.add(f"k{i}", text, mh)
        kept.append(i)
        texts.append(text)
    funnel, remaining = [("generated", len(candidates))], len(candidates)
    for name in FILTERS:
        if name == "judge" and filters.min_judge_score is None:
            continue
        remaining -= left[name]
        funnel.append((name, remaining))
    return Curated(kept, texts, rejected, funnel)


def funnel_lines(funnel: Sequence[tuple[str, int]]) -> list[str]:
    """`generated 400 -> format 391 -> ... -> kept 312` as one line per stage with what each removed."""
    lines, before = [], None
    for stage, n in funnel:
        lines.append(f"{stage:>10}: {n}" + ("" if before is None else f"  (-{before - n})"))
        before = n
    return lines
