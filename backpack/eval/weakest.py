"""Where a student version is weakest, pure: its judged answers and fact scores ranked, worst first, so that
`synthesis.source: failures` asks the teachers for new prompts near those (closing the loop: generate where the
student is weak). The inputs are what `backpack eval --judge` and `backpack eval --questions` store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from backpack.eval.facts import score


@dataclass(frozen=True)
class Weak:
    id: str
    task: str
    prompt: str
    badness: float      # 0 is the worst: the student's points, its score mapped to 0-1, or its share of facts
    why: str


def judged_weak(summary: dict, judge: str) -> list[Weak]:
    """The prompts of one version's judge summary (eval/judge-<teacher>.json, one version's entry): pairwise
    points where both orders were read, else the 1-10 score mapped to 0-1."""
    out = []
    for p in summary.get("per_prompt", []):
        if p.get("points") is not None:
            out.append(Weak(p["id"], p["task"], p["prompt"], p["points"],
                            f"judged by {judge}: {p['points']:.1f} against the teacher"))
        elif p.get("score") is not None:
            out.append(Weak(p["id"], p["task"], p["prompt"], (p["score"] - 1) / 9,
                            f"judged by {judge}: score {p['score']:g}/10"))
    return out


def facts_weak(facts: dict) -> list[Weak]:
    """The questions of a fact evaluation (eval/facts-<file>.json) by the share of facts the distilled student
    gave without context."""
    out = []
    for a in facts.get("answers", []):
        if "distilled" not in a:
            continue
        share = score(a["distilled"], tuple(tuple(f) for f in a["facts"]))
        out.append(Weak(a["id"], a.get("task", "default"), a["question"], share,
                        f"gave {share:.0%} of the facts"))
    return out


def weakest(weak: Iterable[Weak], count: int) -> list[Weak]:
    """The `count` weakest distinct prompts, worst first (a prompt judged twice counts at its worst), leaving out
    those the student did well on (badness 1: it won, or gave every fact)."""
    worst: dict[str, Weak] = {}
    for w in weak:
        if w.prompt not in worst or w.badness < worst[w.prompt].badness:
            worst[w.prompt] = w
    ranked = sorted((w for w in worst.values() if w.badness < 1), key=lambda w: (w.badness, w.prompt))
    return ranked[:count]


def latest_version(judged: dict[str, dict], facts: list[dict]) -> Optional[int]:
    """The newest student version that was judged or fact-scored (0: the base student; None: none was)."""
    versions = [int(v) for summary in judged.values() for v in summary]
    versions += [f["student_version"] for f in facts if f.get("student_version") is not None]
    return max(versions, default=None)

