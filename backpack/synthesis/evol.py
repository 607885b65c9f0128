"""Evol-Instruct's in-depth rewrites, pure: a kept prompt rewritten deeper, more concrete or more constrained,
so the set gets harder prompts and not only more of the same kind. The rewrite is a candidate like any other:
curation judges it (one too close to its parent is a `near` duplicate of it)."""

from __future__ import annotations

import random
import re
from typing import Sequence

from backpack.synthesis.self_instruct import Request, parse_reply

EVOLUTIONS = {
    "deepen": ("Rewrite the task so that answering it needs deeper reasoning or more knowledge: ask why or how, "
               "not only what."),
    "concretize": ("Rewrite the task so that it is more concrete: replace general words with a specific case, "
                   "name, number or situation."),
    "constrain": ("Rewrite the task with one more requirement on the answer: a length, a format, an audience, or "
                  "something to include or avoid."),
}
INSTRUCTION = (
    "Here is a task for an AI assistant:\n\n{task}\n\n{how} The rewritten task must still be one self-contained "
    "request a user could send, at most three sentences. Answer with the rewritten task only.")
_LABEL = re.compile(r"^\s*(?:here is (?:the|a|my) )?(?:rewritten|new|revised)?\s*(?:task|prompt|instruction|"
                    r"request|version)\s*:\s*", re.I)


def build_evol_requests(round_: int, first_index: int, count: int, kept: Sequence[tuple[str, str]],
                        evolutions: Sequence[str], seed: int) -> list[Request]:
    """`count` rewrites of round `round_` (indices from `first_index`): kept (prompt, task) pairs sampled without
    replacement, the kind of rewrite cycling through `evolutions`; the same inputs give the same requests."""
    rng = random.Random(f"evol:{seed}:{round_}")
    parents = rng.sample(list(kept), min(count, len(kept)))
    out = []
    for j, (text, task) in enumerate(parents):
        kind = evolutions[(round_ + j) % len(evolutions)]
        content = INSTRUCTION.format(task=text, how=EVOLUTIONS[kind])
        out.append(Request(round_, first_index + j, [], task, [{"role": "user", "content": content}],
                           parent=text, evolution=kind))
    return out


def parse_rewrite(text: str) -> list[str]:
    """The rewritten prompt of a reply: the reply without a leading "Rewritten task:" label (the first item when
    the teacher answered with a list); none for an empty reply."""
    items = parse_reply(_LABEL.sub("", (text or "").strip(), count=1))
    return items[:1]
