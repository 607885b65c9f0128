"""Knowledge packs: the files a user writes for the Mental Process, validated once, like the run config.

A pack is YAML (or JSON) of the form

    tasks:
      support:                         # task name, as prompts name it
        persona: You are a calm, empathetic support agent of Acme.
        passages:                      # domain knowledge, each with an id unique in its task
          - {id: refunds, text: "Refunds are paid within 30 days of a return ..."}
        experiences:                   # worked examples: a question and the answer given
          - {id: ex-1, question: "Can I return a used kettle?", answer: "Yes, within 30 days ..."}

or JSON Lines, one record a line, the task named on each:

    {"task": "support", "persona": "You are a calm, empathetic support agent of Acme."}
    {"task": "support", "id": "refunds", "text": "Refunds are paid within 30 days of a return ..."}
    {"task": "support", "id": "ex-1", "question": "Can I return a used kettle?", "answer": "Yes, ..."}

Every problem (a malformed file, an empty pack or task, a duplicate id, an empty text) is reported at once,
each naming the task and id it is about.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backpack.errors import ConfigError, InputError

PACK = "knowledge pack"


@dataclass(frozen=True)
class Item:
    """One recallable piece of knowledge: a passage or an experience, with the text that is matched against
    the prompt (`key`) and the text that goes into the context (`text`)."""
    id: str
    kind: str   # "passage" | "experience"
    key: str
    text: str


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Passage(_Strict):
    id: str = Field(min_length=1, max_length=200)
    text: str = Field(min_length=1)

    def item(self) -> Item:
        """A passage is matched and recalled by its text."""
        return Item(self.id, "passage", self.text, self.text)


class Experience(_Strict):
    id: str = Field(min_length=1, max_length=200)
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)

    def item(self) -> Item:
        """An experience is matched by its question and recalled as the worked question and answer."""
        return Item(self.id, "experience", self.question, f"Q: {self.question}\nA: {self.answer}")


class TaskKnowledge(_Strict):
    persona: str = ""
    passages: list[Passage] = Field(default_factory=list)
    experiences: list[Experience] = Field(default_factory=list)

    def items(self) -> list[Item]:
        """The task's recallable items: passages match on their text, experiences on their question."""
        return [p.item() for p in self.passages] + [e.item() for e in self.experiences]


class KnowledgePack(_Strict):
    tasks: dict[str, TaskKnowledge]


def parse_pack(data: dict, source: str) -> KnowledgePack:
    """A validated pack from parsed YAML/JSON; ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(source, ["(file): a knowledge pack is a mapping with a 'tasks:' key"], PACK)
    try:
        pack = KnowledgePack(**data)
    except ValidationError as e:
        raise ConfigError(source, [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()],
                          PACK) from None
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
        raise ConfigError(source, problems, PACK)
    return pack


def _jsonl_data(text: str, source: str) -> dict:
    """JSON Lines records -> the mapping form of a pack (problems listed with their line numbers)."""
    tasks: dict[str, dict] = {}
    problems = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: not JSON ({e.msg})")
            continue
        except RecursionError:
            problems.append(f"line {n}: nested too deeply")
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("task"), str) or not rec["task"]:
            problems.append(f"line {n}: each record is an object naming its 'task'")
            continue
        task = tasks.setdefault(rec.pop("task"), {"persona": "", "passages": [], "experiences": []})
        if set(rec) == {"persona"}:
            task["persona"] = rec["persona"]
        elif "text" in rec:
            task["passages"].append(rec)
        elif "question" in rec or "answer" in rec:
            task["experiences"].append(rec)
        else:
            problems.append(f"line {n}: a record holds a persona, a passage (id, text) or an experience "
                            f"(id, question, answer); got fields {sorted(rec)}")
    if problems:
        raise ConfigError(source, problems, PACK)
    return {"tasks": tasks}


def pack_jsonl(pack: KnowledgePack) -> str:
    """A pack as JSON Lines (the form `load_pack` reads from a .jsonl file)."""
    lines = []
    for name, k in pack.tasks.items():
        if k.persona:
            lines.append({"task": name, "persona": k.persona})
        lines += [{"task": name, **p.model_dump()} for p in k.passages]
        lines += [{"task": name, **e.model_dump()} for e in k.experiences]
    return "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)


def load_pack(path: str | Path) -> KnowledgePack:
    """Read and validate a pack file (.yaml, .yml, .json or .jsonl)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"knowledge pack not found: {str(path)!r}")
    kind = {".json": "JSON", ".jsonl": "JSON Lines"}.get(p.suffix, "YAML")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".jsonl":
            data = _jsonl_data(text, str(path))
        else:
            data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(str(path), [f"(file): not valid {kind}: {str(e).splitlines()[0]}"], PACK) from None
    except RecursionError:
        raise ConfigError(str(path), ["(file): nested too deeply to be a knowledge pack"], PACK) from None
    return parse_pack(data, str(path))
