"""Curating synthesized prompts: nothing dropped silently.

A candidate prompt passes a fixed order of filters; the first one it fails is its reason, and it goes to the
rejected table with that reason (and, for a duplicate or a leak, the prompt it matches). The funnel is the count
left after each filter, so generated = kept + every rejected count, always.

Filters, in order:
  format      empty, too short or too long (characters), or not one line of instruction text (a list of several
              prompts pasted together, leftover numbering or markup)
  refusal     the teacher declined or commented instead of writing a prompt ("I'm sorry", "As an AI")
  question    not a request: no question mark and no instruction verb at its start
  topic       (with references: a knowledge pack's source) no content word in common with the passage(s) its
              request showed: a question about something else, which the pack cannot answer
  exact       the same text (case, spacing and punctuation ignored) as a prompt kept before it
  seed        near-duplicate of a seed prompt (MinHash Jaccard over character 5-grams >= `near_threshold`), or
              a seed held word for word inside it
  heldout     the same for a held-out evaluation prompt: would leak evaluation into training
  near        near-duplicate of a prompt kept before it
  judge       (optional) the judge's 1-10 score of the prompt below `min_judge_score`, or no score (the judge's
              reply unreadable twice): `unjudged` lists those with none yet, for the caller to ask

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
    unjudged: list[int] = field(default_factory=list)  # reached the judge filter with no score: ask the judge

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rejected:
            out[r.reason] = out.get(r.reason, 0) + 1
        return out


FILTERS = ("format", "refusal", "question", "topic", "exact", "seed", "heldout", "near", "judge")
STOPWORDS = frozenset("""
    about above after again also been before being below between both could does doing down during each every
    from further have having here into just more most much must only other over same should some such than that
    their them then there these they this those through under until very were what when where which while whom
    whose will with would your yours
""".split())


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
    """Prompts indexed for near-duplicate look-up (MinHash LSH at `threshold`). With `containment`, a candidate
    that holds an indexed prompt word for word (a seed copied, then continued) matches it too: its Jaccard
    similarity falls with every word added, its containment does not."""

    MIN_CONTAINED = 20  # characters: shorter prompts ("Name a colour") occur inside unrelated ones

    def __init__(self, threshold: float, containment: bool = False):
        from datasketch import MinHashLSH

        self.threshold, self.containment = threshold, containment
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self.hashes: dict[str, object] = {}
        self.texts: dict[str, str] = {}

    def add(self, key: str, text: str, mh=None) -> None:
        if key in self.hashes:
            return
        mh = mh if mh is not None else minhash(text)
        self.lsh.insert(key, mh)
        self.hashes[key], self.texts[key] = mh, text

    def match(self, mh, text: str = "") -> Optional[str]:
        """The indexed prompt most similar to `mh` at or above the threshold (or held in `text`), or None."""
        if self.containment and text:
            t = normal(text)
            for key, other in self.texts.items():
                o = normal(other)
                if len(o) >= self.MIN_CONTAINED and o in t:
                    return other
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


def content_words(text: str) -> set[str]:
    """Words of four letters or more that carry a topic (the commonest function words left out), a plural's
    "s" dropped ("Saturdays" is about Saturday)."""
    words = {w for w in normal(text).split() if len(w) >= 4 and w not in STOPWORDS}
    return {w[:-1] if w.endswith("s") and len(w) > 4 else w for w in words}


def trim_question(text: str) -> str:
    """A written question without what follows its last question mark (small teachers answer their own
    questions: "Can I call on a Saturday? Yes." is the question "Can I call on a Saturday?")."""
    end = text.rfind("?")
    return text[:end + 1] if end >= 0 else text


def _is_request(text: str) -> bool:
    if "?" in text:
        return True
    first = normal(text).split(" ", 1)[0]
    return first in INSTRUCTION_VERBS


def curate(candidates: Sequence[str], seeds: Iterable[str] = (), heldout: Iterable[str] = (),
           filters: Filters = Filters(), judge_scores: Optional[Sequence[Optional[float]]] = None,
           references: Optional[Sequence[str]] = None) -> Curated:
    """Filter `candidates` in order (see the module docstring); every one is kept or rejected with a reason.
    `references[i]`, when given, is the text candidate i must be about (the `topic` filter)."""
    seed_index, held_index = (NearIndex(filters.near_threshold, containment=True) for _ in range(2))
    kept_index = NearIndex(filters.near_threshold)
    for i, s in enumerate(seeds):
        seed_index.add(f"s{i}", s)
    for i, h in enumerate(heldout):
        held_index.add(f"h{i}", h)
    exact: dict[str, str] = {}
    kept, texts, rejected, unjudged = [], [], [], []
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
        if references is not None and not content_words(text) & content_words(references[i]):
            reject(i, text, "topic")
            continue
        key = normal(text)
        if key in exact:
            reject(i, text, "exact", exact[key])
            continue
        mh = minhash(text)
        dup = seed_index.match(mh, text)
        if dup is not None:
            reject(i, text, "seed", dup)
            continue
        dup = held_index.match(mh, text)
        if dup is not None:
            reject(i, text, "heldout", dup)
            continue
        dup = kept_index.match(mh)
        if dup is not None:
            reject(i, text, "near", dup)
            continue
        score = judge_scores[i] if judge_scores is not None else None
        if filters.min_judge_score is not None and (score is None or score < filters.min_judge_score):
            if score is None:
                unjudged.append(i)
            reject(i, text, "judge")
            continue
        exact[key] = text
        kept_index.add(f"k{i}", text, mh)
        kept.append(i)
        texts.append(text)
    funnel, remaining = [("generated", len(candidates))], len(candidates)
    used = {"topic": references is not None, "judge": filters.min_judge_score is not None}
    for name in FILTERS:
        if not used.get(name, True):
            continue
        remaining -= left[name]
        funnel.append((name, remaining))
    return Curated(kept, texts, rejected, funnel, unjudged)


def funnel_lines(funnel: Sequence[tuple[str, int]]) -> list[str]:
    """`generated 400 -> format 391 -> ... -> kept 312` as one line per stage with what each removed."""
    lines, before = [], None
    for stage, n in funnel:
        lines.append(f"{stage:>10}: {n}" + ("" if before is None else f"  (-{before - n})"))
        before = n
    return lines
