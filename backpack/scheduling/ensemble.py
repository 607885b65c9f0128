"""Policy ensemble: ask k teachers each Query, keep every answer or one by a rule. Pure, no Ray.

The scheduler sends a copy of each batch to each asked teacher (pinned to it; the least-loaded of its replicas
takes it, see scheduling/routing.py) and hands each copy's outcome, answered or failed, to an `EnsembleHold`. The hold
is keyed by query id, not by batch: the halves of a split copy, and copies cut to different teachers' batch
sizes, join back all the same. Once every asked teacher has answered or failed a Query, its rows are written
together (one shard holds them, a stream acknowledges the prompt once), by `keep`:

    all        every answer, each row naming its teacher: n rows per teacher that answered
    first      the answer of the first teacher that answered, in the order asked (scheduler.ensemble.teachers
               when it lists names, else the teachers' config order)
    longest    the answer with the most characters (mean over its n samples; characters, not tokens: the
               teachers' tokenizers differ)
    agreement  the answer most like the others: the highest mean chrF (sacrebleu, taken both ways so the measure
               is symmetric) against the other teachers' answers. Needs three answers or more: of two, each is
               exactly as like the other, so (a teacher having failed, say) it keeps the first
    logprob    the highest mean token logprob (per sample, then over the n samples): the teacher most sure of
               its answer. Only when every answering teacher's rows carry token_logprobs (decoding.logprobs >= 1),
               else agreement. Logprobs of different models are a rough measure, not a calibrated one
Ties go to the teacher asked first. A rule keeps all n samples of the teacher it picks.

Failures: a Query is answered when one asked teacher answered it. The other teachers' failures of it are then
not written (the dataset holds answers; a failed row would only tell a reader the Query failed, which it did
not); they are counted as `teacher_failures`. A Query every asked teacher failed is written as each teacher's
failed row, so every cause is on record.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from backpack.core.types import OK

Answers = dict[str, list[dict]]  # teacher -> its ok rows of one Query (dicts with text, token_logprobs)


def _best(answers: Answers, order: Sequence[str], score: Callable[[str], float]) -> str:
    """The teacher with the highest score(teacher); ties go to the one earlier in `order`."""
    ranked = [t for t in order if t in answers] + [t for t in answers if t not in order]
    return max(ranked, key=lambda t: (score(t), -ranked.index(t)))


def first(answers: Answers, order: Sequence[str]) -> str:
    return _best(answers, order, lambda t: 0.0)


def longest(answers: Answers, order: Sequence[str]) -> str:
    return _best(answers, order, lambda t: sum(len(r["text"] or "") for r in answers[t]) / len(answers[t]))


_chrf = None  # sacrebleu's CHRF scorer, made on first use


def similarity(a: str, b: str) -> float:
    """chrF of `a` against `b` and of `b` against `a`, averaged (chrF weighs recall over precision, so one way
    alone would favour the longer answer)."""
    global _chrf
    if _chrf is None:
        from sacrebleu.metrics import CHRF

        _chrf = CHRF()
    return (_chrf.sentence_score(a, [b]).score + _chrf.sentence_score(b, [a]).score) / 2


def agreement(answers: Answers, order: Sequence[str]) -> str:
    if len(answers) < 3:
        return first(answers, order)  # of two answers (or one), each is as like the other: nothing to choose by

    def score(teacher: str) -> float:
        mine = [r["text"] or "" for r in answers[teacher]]
        theirs = [r["text"] or "" for t, rows in answers.items() if t != teacher for r in rows]
        return sum(similarity(a, b) for a in mine for b in theirs) / (len(mine) * len(theirs))

    return _best(answers, order, score)


def _mean_logprob(rows: list[dict]) -> float:
    return sum(sum(r["token_logprobs"]) / len(r["token_logprobs"]) for r in rows) / len(rows)


def logprob(answers: Answers, order: Sequence[str]) -> str:
    if not all(r.get("token_logprobs") for rows in answers.values() for r in rows):
        return agreement(answers, order)  # some answer has no logprobs: nothing to compare them by
    return _best(answers, order, lambda t: _mean_logprob(answers[t]))


RULES: dict[str, Callable[[Answers, Sequence[str]], str]] = {
    "first": first, "longest": longest, "agreement": agreement, "logprob": logprob}
KEEP = ("all",) + tuple(RULES)


def pick_teachers(order: Sequence[str], live: Iterable[str], want: int | Sequence[str]) -> list[str]:
    """The teachers to ask, in the order asked. `want` names them (kept as given, live or not: a dead teacher's
    copy fails, or waits for its respawn in a stream), or is k: the first k teachers of `order` with a live
    replica, then, when fewer are live, the dead ones in order (same fate)."""
    if not isinstance(want, int):
        return list(want)
    live = set(live)
    chosen = set(sorted(order, key=lambda t: t not in live)[:want])  # stable sort: config order, live first
    return [t for t in order if t in chosen]


def _ok_rows(table: pa.Table) -> int:
    return int(pc.sum(pc.equal(table.column("status"), OK).cast(pa.int64())).as_py() or 0)


class EnsembleHold:
    """Each asked teacher's rows of each Query, until every asked teacher has answered or failed it; then the
    rows `keep` says are written (see the module docstring). Counts, for the run summary: `unkept_rows` and
    `unkept_tokens` (answers a rule did not keep: paid for, not stored) and `teacher_failures` (failed rows of
    Queries another teacher answered, not written)."""

    def __init__(self, keep: str):
        if keep not in KEEP:
            raise ValueError(f"unknown ensemble keep {keep!r} (choose from {', '.join(KEEP)})")
        self.keep = keep
        self._asked: dict[str, tuple[str, ...]] = {}     # query id -> teachers asked, in order
        self._got: dict[str, dict[str, pa.Table]] = {}   # query id -> teacher -> its rows (answered or failed)
        self.unkept_rows = self.unkept_tokens = self.teacher_failures = 0

    def __len__(self) -> int:
        """Queries asked and not yet resolved."""
        return len(self._asked)

    @property
    def partial(self) -> int:
        """Queries with some outcomes held (their rows are in memory) and not yet all."""
        return len(self._got)

    def started(self, query_ids: Iterable[str]) -> bool:
        """Whether some teacher's outcome of one of these Queries is held (their other copies must go on)."""
        return any(q in self._got for q in query_ids)

    def expect(self, query_ids: Iterable[str], teachers: Sequence[str]) -> None:
        for q in query_ids:
            self._asked[q] = tuple(teachers)

    def add(self, teacher: str, table: pa.Table) -> Optional[pa.Table]:
        """Hold `teacher`'s rows (answers or failed rows); return the rows to write of the Queries this
        completes, or None. Rows of a Query not expected pass through (nothing is dropped)."""
        at: dict[str, list[int]] = defaultdict(list)
        for i, q in enumerate(table.column("query_id").to_pylist()):
            at[q].append(i)
        out = []
        for q, idx in at.items():
            rows = table.take(idx)
            if q not in self._asked:
                out.append(rows)
                continue
            got = self._got.setdefault(q, {})
            got[teacher] = pa.concat_tables([got[teacher], rows]) if teacher in got else rows
            if got.keys() >= set(self._asked[q]):
                out.append(self._resolve(q))
        return pa.concat_tables(out) if out else None

    def finish(self, complete: bool = True) -> Optional[pa.Table]:
        """Resolve the Queries still held with the outcomes they have (an asked teacher with none counts as not
        answering). complete=False (a stream stopping, copies not sent left in the stream): a Query no teacher
        answered yet is not written, so the stream gives it again. Queries with no outcome are forgotten."""
        out = []
        for q in list(self._asked):
            got = self._got.get(q, {})
            if not got or (not complete and not any(_ok_rows(t) for t in got.values())):
                self._asked.pop(q)
                self._got.pop(q, None)
                continue
            self._asked[q] = tuple(t for t in self._asked[q] if t in got)
            out.append(self._resolve(q))
        return pa.concat_tables(out) if out else None

    def _resolve(self, q: str) -> pa.Table:
        asked, got = self._asked.pop(q), self._got.pop(q)
        answered = [t for t in asked if _ok_rows(got[t])]
        if not answered:
            return pa.concat_tables([got[t] for t in asked])  # every teacher failed it: each cause on record
        self.teacher_failures += sum(got[t].num_rows for t in asked if t not in answered)
        if self.keep == "all":
            kept = answered
        else:
            ok = {t: got[t].filter(pc.equal(got[t].column("status"), OK))
                  .select(["text", "token_logprobs"]).to_pylist() for t in answered}
            kept = [RULES[self.keep](ok, asked)]
        for t in answered:
            if t not in kept:
                self.unkept_rows += _ok_rows(got[t])
                self.unkept_tokens += int(pc.sum(got[t].column("completion_tokens")).as_py() or 0)
        return pa.concat_tables([got[t] for t in kept])
