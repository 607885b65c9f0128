"""Knowledge packs: the files a user writes for the Mental Process, validated once.

A pack is YAML (or JSON) of the form

    tasks:
      support:                         # task name, as prompts name it
        persona: You are a calm, empathetic support agent of Acme.
        passages:                      # domain knowledge, each with an id unique in its task
          - {id: refunds, text: "Refunds are paid within 30 days of a return ..."}
        experiences:                   # worked examples: a question and the answer given
          - {id: ex-1, question: "Can I return a used kettle?", answer: "Yes, within 30 days ..."}

Every problem (a malformed file, an empty pack or task, a duplicate id, an empty text) is reported at once,
each naming the task and id it is about.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backpack.core.recall import Item
from backpack.errors import ConfigError, InputError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Passage(_Strict):
    id: str = Field(min_length=1, max_length=200)
    text: str = Field(min_length=1)


class Experience(_Strict):
    id: str = Field(min_length=1, max_length=200)
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class TaskKnowledge(_Strict):
    persona: str = ""
    passages: list[Passage] = Field(default_factory=list)
    experiences: list[Experience] = Field(default_factory=list)

    def items(self) -> list[Item]:
        """The task's recallable items: passages match on their text, experiences on their question."""
        return ([Item(p.id, "passage", p.text, p.text) for p in self.passages]
                + [Item(e.id, "experience", e.question, f"Q: {e.question}\nA: {e.answer}") for e in self.experiences])


class KnowledgePack(_Strict):
    tasks: dict[str, TaskKnowledge]


def parse_pack(data: dict, source: str) -> KnowledgePack:
    """A validated pack from parsed YAML/JSON; ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(source, ["(file): a knowledge pack is a mapping with a 'tasks:' key"])
    try:
        pack = KnowledgePack(**data)
    except ValidationError as e:
        raise ConfigError(source, [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                                   for err in e.errors()]) from None
    problems = []
    if not pack.tasks:
        problems.append("tasks: the pack is empty (no task)")
    for name, task in pack.tasks.items():
        if not (task.persona.strip() or task.passages or task.experiences):
            problems.append(f"tasks.{name}: empty task (no persona, passages or experiences)")
        seen: set[str] = set()
        for it in task.items():
            if it.id in seen:
                problems.append(f"tasks.{name}: duplicate id {it.id!r}")
            seen.add(it.id)
            if not it.text.strip():
                problems.append(f"tasks.{name}: {it.kind} {it.id!r} has no text")
    if problems:
        raise ConfigError(source, problems)
    return pack


def load_pack(path: str | Path) -> KnowledgePack:
    """Read and validate a pack file (.yaml, .yml or .json)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"knowledge pack not found: {str(path)!r}")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(str(path), [f"(file): not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                                      f"{str(e).splitlines()[0]}"]) from None
    return parse_pack(data, str(path))
