"""A teacher as judge, pure: the prompts it is asked, how its replies are read, how verdicts add up.

Pairwise: the judge sees a question and two answers and ends with `Verdict: A`, `Verdict: B` or `Verdict: tie`.
Every pair is asked in both orders (the student's answer first, then second) so a judge that prefers a position
cancels out; per prompt the student scores 1 for a win, 0.5 for a tie, 0 for a loss, averaged over the two
orders. The win rate is the mean over prompts with a normal-approximation 95% interval.

Single answer: a 1-10 score (`Score: N`) and a one-line reason (`Reason: ...`), reference-guided when the prompt
has a reference (the teacher's answer, or facts). A synthesized prompt is scored the same way on its own
(`prompt_rubric_messages`: clear, self-contained, useful).

A reply that cannot be read is re-asked once with a reminder of the format (`reask_messages`); still unreadable,
it is counted as unparsed and scored nowhere.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

PAIRWISE = (
    "You are a strict judge of AI assistant answers. Compare the two answers to the user's question for "
    "helpfulness, correctness and clarity. Ignore their order and their length.\n\n"
    "[Question]\n{question}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\n"
    "Explain in one sentence, then end with exactly one line: 'Verdict: A', 'Verdict: B' or 'Verdict: tie'.")
RUBRIC = (
    "You are a strict judge of AI assistant answers. Rate the answer to the user's question from 1 (useless or "
    "wrong) to 10 (perfect){guided}.\n\n[Question]\n{question}\n\n{reference}[Answer]\n{answer}\n\n"
    "Reply with exactly two lines: 'Score: <1-10>' then 'Reason: <one sentence>'.")
PROMPT_RUBRIC = (
    "You are a strict judge of tasks for training an AI assistant. Rate this task from 1 (unusable: unclear, "
    "not a request, impossible to answer or harmful) to 10 (a clear, self-contained, useful request a real user "
    "could send).\n\n[Task]\n{prompt}\n\nReply with exactly two lines: 'Score: <1-10>' then 'Reason: <one "
    "sentence>'.")
REMINDER = {"pairwise": "Give only your final verdict as one line: 'Verdict: A', 'Verdict: B' or 'Verdict: tie'.",
            "rubric": "Give only two lines: 'Score: <a whole number from 1 to 10>' and 'Reason: <one sentence>'."}

_VERDICT = re.compile(r"verdict\s*[:\-]\s*\**\s*\[?\s*(a|b|tie)\b", re.I)
_SCORE = re.compile(r"score\s*[:\-]\s*\**\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?", re.I)
_REASON = re.compile(r"reason\s*[:\-]\s*(.+)", re.I)


def pairwise_messages(question: str, a: str, b: str) -> list[dict]:
    return [{"role": "user", "content": PAIRWISE.format(question=question, a=a, b=b)}]


def rubric_messages(question: str, answer: str, reference: Optional[str] = None) -> list[dict]:
    ref = f"[Reference answer]\n{reference}\n\n" if reference else ""
    guided = ", using the reference answer as the standard of correctness" if reference else ""
    return [{"role": "user", "content": RUBRIC.format(question=question, answer=answer, reference=ref,
                                                      guided=guided)}]


def prompt_rubric_messages(prompt: str) -> list[dict]:
    """A 1-10 score of a candidate prompt itself (curation's judge filter); read with `parse_rubric`."""
    return [{"role": "user", "content": PROMPT_RUBRIC.format(prompt=prompt)}]


def reask_messages(messages: list[dict], reply: str, kind: str) -> list[dict]:
    """The same request once more, after the judge's unreadable reply, with a reminder of the format."""
    return [*messages, {"role": "assistant", "content": reply or ""}, {"role": "user", "content": REMINDER[kind]}]


def parse_verdict(text: str) -> Optional[str]:
    """'A', 'B' or 'tie' from a pairwise reply (its last verdict line), None when it gives none."""
    found = _VERDICT.findall(text or "")
    if not found:
        return None
    v = found[-1].lower()
    return "tie" if v == "tie" else v.upper()


def parse_rubric(text: str) -> Optional[tuple[float, str]]:
    """(score, reason) from a single-answer reply, None when there is no score from 1 to 10."""
    m = _SCORE.search(text or "")
    if not m:
        return None
    score = float(m.group(1))
    if not 1 <= score <= 10:
        return None
    r = _REASON.search(text)
    return score, (r.group(1).strip() if r else "")


@dataclass
class PairwiseResult:
    win_rate: float          # the student's mean score over prompts judged in both orders
    ci95: float              # half-width of the normal-approximation 95% interval
    wins: int                # prompts the student won in both orders (or won one, tied the other)
    ties: int
    losses: int
    inconsistent: int        # prompts whose two orders disagree (one win, one loss): position bias
    judged: int              # prompts with a readable verdict in both orders
    unparsed: int            # verdicts unreadable after the re-ask

    def as_dict(self) -> dict:
        return dict(vars(self))


def _student_points(verdict: str, student_is: str) -> float:
    return 0.5 if verdict == "tie" else 1.0 if verdict == student_is else 0.0


def order_points(student_first: Sequence[Optional[str]], student_second: Sequence[Optional[str]]
                 ) -> list[Optional[tuple[float, float]]]:
    """The student's points per prompt in each order (A, B), or None where either verdict is unreadable."""
    if len(student_first) != len(student_second):
        raise ValueError("both orders must hold a verdict (or None) per prompt")
    return [None if first is None or second is None else (_student_points(first, "A"), _student_points(second, "B"))
            for first, second in zip(student_first, student_second)]


def aggregate_pairwise(student_first: Sequence[Optional[str]], student_second: Sequence[Optional[str]]
                       ) -> PairwiseResult:
    """Verdicts per prompt, asked with the student's answer as A (`student_first`) and as B; None: unparsed."""
    points, wins, ties, losses, inconsistent = [], 0, 0, 0, 0
    unparsed = sum(v is None for v in [*student_first, *student_second])
    for pair in order_points(student_first, student_second):
        if pair is None:
            continue
        a, b = pair
        p = (a + b) / 2
        points.append(p)
        inconsistent += {a, b} == {0.0, 1.0}
        wins += p > 0.5
        ties += p == 0.5
        losses += p < 0.5
    n = len(points)
    mean = sum(points) / n if n else float("nan")
    var = sum((p - mean) ** 2 for p in points) / (n - 1) if n > 1 else float("nan")
    ci = 1.96 * math.sqrt(var / n) if n > 1 else float("nan")
    return PairwiseResult(mean, ci, wins, ties, losses, inconsistent, n, unparsed)
