"""Questions from a knowledge pack, pure: for each passage and experience, requests asking a teacher for
questions a user could ask that it answers, phrased several ways, so that context distillation trains on more
than the hand-written prompts. The driver (backpack/run/synthesize.py) sends them like Self-Instruct's.

Requests walk the pack's items in order, one item per request, and change style each time the walk comes back
to the start, so a pack of 20 items asked 80 times gets every style for every item:
  direct      a question about each fact (prices, dates, names, numbers)
  paraphrase  everyday words, not the text's
  indirect    the user's situation instead of the fact's name ("my daughter is seven, which bike ...")
  combine     two items: each question needs both
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from backpack.config.knowledge import KnowledgePack
from backpack.synthesis.self_instruct import Request

STYLES = ("direct", "paraphrase", "indirect", "combine")
_ASK = {
    "direct": "Ask about the facts in it: each question about one price, date, name, number or rule it gives.",
    "paraphrase": "Use the everyday words a customer would use, not the words of the text.",
    "indirect": ("Describe the customer's own situation instead of naming the fact, as in \"My son is eight: "
                 "which bike fits him?\"."),
    "combine": "Each question needs facts from both texts to answer it.",
}
INSTRUCTION = (
    "Here {is_are} from the help pages of a company:\n\n{texts}\n\nWrite {n} different questions a customer "
    "could ask that {this_these} answer{s}. {ask} Here is a customer question of the kind we want: \"{example}\" "
    "Answer with the numbered list of questions only, starting at 1.")


@dataclass(frozen=True)
class PackItem:
    id: str
    task: str
    text: str


def pack_items(pack: KnowledgePack) -> list[PackItem]:
    """Every passage and experience of every task, in the pack's order (experiences as their worked question and
    answer, which is how recall shows them)."""
    return [PackItem(it.id, task, it.text) for task, knowledge in pack.tasks.items() for it in knowledge.items()]


def example_questions(pack: KnowledgePack) -> list[str]:
    """The pack's own questions (its experiences'): shown as examples of a user's question, and, like Self-
    Instruct's seeds, near-copies of them are not new prompts."""
    return [e.question for knowledge in pack.tasks.values() for e in knowledge.experiences]


def build_pack_requests(round_: int, count: int, items: Sequence[PackItem], examples: Sequence[str],
                        per_request: int, seed: int) -> list[Request]:
    """The `count` requests of round `round_` (the same inputs give the same requests, so a rerun resumes)."""
    rng = random.Random(f"pack:{seed}:{round_}")
    out = []
    for i in range(count):
        k = (round_ - 1) * count + i
        item = items[k % len(items)]
        style = STYLES[(k // len(items)) % len(STYLES)]
        shown = [item]
        same_task = [o for o in items if o.task == item.task and o.id != item.id]
        if style == "combine" and same_task:
            shown.append(rng.choice(same_task))
        else:
            style = "direct" if style == "combine" else style
        many = len(shown) > 1
        content = INSTRUCTION.format(
            is_are="are two texts" if many else "is a text", texts="\n\n".join(s.text for s in shown),
            n=per_request, this_these="these texts" if many else "this text", s="" if many else "s",
            ask=_ASK[style], example=rng.choice(list(examples)) if examples else "How long is the warranty?")
        out.append(Request(round_, i, [s.id for s in shown], item.task, about="\n".join(s.text for s in shown),
                           messages=[{"role": "user", "content": content}]))
    return out
