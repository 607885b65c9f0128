"""Self-Instruct's request and reply, pure: which examples a request shows, what it asks, how a reply becomes
candidate prompts. The driver (backpack/run/synthesize.py) sends the requests through the scheduler."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Sequence

INSTRUCTION = (
    "You write tasks for training an AI assistant. Here are some example tasks:\n\n{examples}\n\n"
    "Write {n} new tasks. Each must be different from the examples and from each other: a different topic "
    "and a different kind of request (questions, instructions, writing, reasoning, coding). Each task is one "
    "self-contained request a user could send, at most two sentences. Answer with the numbered list only, "
    "starting at {start}.")

FAILURES_INSTRUCTION = (  # source failures: the examples are prompts a student version did worst on
    "A student assistant answered these tasks badly:\n\n{examples}\n\nWrite {n} new tasks on the same topics and "
    "of the same kinds, so that it can practise them: each different from the examples and from each other, one "
    "self-contained request a user could send, at most two sentences. Answer with the numbered list only, "
    "starting at {start}.")

_ITEM = re.compile(r"^\s*(\d+)\s*[.):]\s*(.+?)\s*$")


@dataclass(frozen=True)
class Seed:
    id: str
    task: str
    text: str


@dataclass
class Request:
    """One request to a teacher: the examples it shows and the chat messages that ask."""

    round: int
    index: int
    seed_ids: list[str]
    task: str                        # the task of the first seed shown: what the new prompts are filed under
    messages: list[dict] = field(default_factory=list)
    about: str = ""                  # what the new prompts must be about (a pack's passages; "": anything)
    parent: str = ""                 # the kept prompt an Evol-Instruct request rewrites ("": a request for new ones)
    evolution: str = ""              # how it rewrites it (backpack/synthesis/evol.py)


def build_requests(round_: int, count: int, seeds: Sequence[Seed], kept: Sequence[str], per_request: int,
                   seeds_shown: int, generated_shown: int, seed: int, instruction: str = INSTRUCTION) -> list[Request]:
    """The `count` requests of round `round_`: the same inputs give the same requests (so a rerun resumes).
    `instruction` is the request's text, with {examples}, {n} and {start} to fill."""
    rng = random.Random(f"{seed}:{round_}")
    out = []
    for i in range(count):
        shown = rng.sample(list(seeds), min(seeds_shown, len(seeds)))
        generated = rng.sample(list(kept), min(generated_shown, len(kept)))
        examples = [s.text for s in shown] + list(generated)
        rng.shuffle(examples)
        listing = "\n".join(f"{j}. {text}" for j, text in enumerate(examples, start=1))
        content = instruction.format(examples=listing, n=per_request, start=len(examples) + 1)
        out.append(Request(round_, i, [s.id for s in shown], shown[0].task,
                           [{"role": "user", "content": content}]))
    return out


def parse_reply(text: str) -> list[str]:
    """The candidate prompts of a teacher's reply: its numbered items (an item's continuation lines joined to it);
    a reply with no numbered item is one candidate, left to curation to judge."""
    items: list[str] = []
    for line in (text or "").splitlines():
        m = _ITEM.match(line)
        if m:
            items.append(m.group(2))
        elif items and line.strip():
            items[-1] += " " + line.strip()
    if not items and (text or "").strip():
        items = [text.strip()]
    return items
