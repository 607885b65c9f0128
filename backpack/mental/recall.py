"""Recall (the self-taking mechanism) over the store: what goes in front of a prompt for a teacher.

`Recaller.recall(task, prompt)` ranks the task's current knowledge with BM25 (`backpack.mental.bm25`) and packs
the persona and the best items into the token budget. `Recaller.annotate(table)` does that for a batch of
Queries in the scheduler, filling the `context`, `recalled_ids` and `knowledge_version` columns; a Query whose
task has no knowledge goes to the teacher unchanged.
"""

from __future__ import annotations

from typing import Optional

import pyarrow as pa

from backpack.mental.bm25 import BM25, Recalled, pack_context
from backpack.mental.store import MentalStore


class TokenCounter:
    """Counts tokens with a model's tokenizer (the budget is in the teacher's tokens). Picklable: the tokenizer
    loads on first use, wherever that is (the driver, the scheduler actor, the server)."""

    def __init__(self, model: str):
        self.model = model
        self._tok = None

    def __getstate__(self):
        return {"model": self.model, "_tok": None}

    def __call__(self, text: str) -> int:
        if self._tok is None:
            from transformers import AutoTokenizer

            from backpack.teachers.loader import resolve_model

            self._tok = AutoTokenizer.from_pretrained(resolve_model(self.model).path)
        return len(self._tok(text, add_special_tokens=False)["input_ids"])


class Recaller:
    """Recall for every task in a MentalStore, within `budget` tokens and `max_items` items."""

    def __init__(self, store: MentalStore, budget: int, count, max_items: int = 4):
        self.store, self.budget, self.count, self.max_items = store, budget, count, max_items
        self._index: dict[str, tuple[int, str, BM25]] = {}  # task -> (version, persona, index)

    def __getstate__(self):
        return {**self.__dict__, "_index": {}}

    def _task(self, task: str, version: int) -> tuple[str, BM25]:
        cached = self._index.get(task)
        if cached is None or cached[0] != version:
            knowledge, _ = self.store.get(task, version)
            cached = (version, knowledge.persona, BM25(knowledge.items()))
            self._index[task] = cached
        return cached[1], cached[2]

    def recall(self, task: str, prompt: str, versions: Optional[dict[str, int]] = None
               ) -> Optional[tuple[Recalled, int]]:
        """(what to put in front of `prompt`, the knowledge version) for `task`; None when the store has no
        knowledge for it. `versions` (from `store.tasks()`) saves a Redis read per prompt in a batch."""
        versions = self.store.tasks() if versions is None else versions
        version = versions.get(task)
        if not version:
            return None
        persona, index = self._task(task, version)
        ranked = [it for it, _ in index.rank(prompt)]
        return pack_context(persona, ranked, self.budget, self.count, self.max_items), version

    def annotate(self, table: pa.Table) -> pa.Table:
        """A QUERY_SCHEMA table with recall filled in for every Query whose task has knowledge."""
        versions = self.store.tasks()  # one snapshot per batch: every Query of it sees the same versions
        if not versions or not set(table.column("task").to_pylist()) & set(versions):
            return table
        contexts, ids, kv = [], [], []
        for task, messages in zip(table.column("task").to_pylist(), table.column("messages").to_pylist()):
            got = self.recall(task, prompt_text(messages), versions)
            if got is None:
                contexts.append(None), ids.append([]), kv.append(None)
                continue
            r, version = got
            contexts.append(r.context or None)
            ids.append(r.ids)
            kv.append(version)
        for name, values in (("context", contexts), ("recalled_ids", ids), ("knowledge_version", kv)):
            i = table.schema.get_field_index(name)
            table = table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))
        return table


def prompt_text(messages: list[dict]) -> str:
    """What recall matches for a conversation: the user's turns (the last one counts twice: it is the question
    being asked). The scheduler and the StudentServer both recall with it, so they choose alike."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return " ".join(users + users[-1:])
