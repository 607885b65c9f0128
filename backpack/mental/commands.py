"""`backpack mental ...`: the knowledge store of a run, from the command line.

    backpack mental import CONFIG FILE                  import a pack (a new version per task that changed)
    backpack mental show CONFIG [TASK] [--json]         the tasks and versions; a task's knowledge and history
    backpack mental add CONFIG TASK --id ID --passage TEXT
    backpack mental add CONFIG TASK --id ID --question Q --answer A
    backpack mental add CONFIG TASK --persona TEXT
    backpack mental export CONFIG FILE|- [--task T ...]  write the current knowledge (.jsonl, .json, else YAML)

They reach the run's Redis like `backpack status` does (the configured server, the live run's embedded one, or
the embedded one started from its files). Each change makes a new knowledge version; dataset rows record the
version their teacher answered with.
"""

from __future__ import annotations

import json
import sys

import yaml
from pydantic import ValidationError

from backpack.config import RunConfig
from backpack.config.knowledge import Experience, Passage, pack_jsonl
from backpack.errors import InputError
from backpack.mental.setup import load_checked_pack, over_budget, token_counter
from backpack.mental.store import MentalStore
from backpack.runtime.session import attach_redis


def _budget(cfg: RunConfig) -> int:
    return cfg.mental_settings().budget


def import_file(cfg: RunConfig, path: str) -> dict:
    pack = load_checked_pack(path, _budget(cfg), token_counter(cfg))  # before the run's Redis is reached
    with attach_redis(cfg) as url:
        return MentalStore(url, cfg.name).import_pack(pack, note=f"import {path}")


def show(cfg: RunConfig, task: str | None, version: int | None = None) -> dict:
    with attach_redis(cfg) as url:
        store = MentalStore(url, cfg.name)
        if task is None:
            return {"tasks": store.tasks()}
        knowledge, v = store.get(task, version)
        return {"task": task, "version": v, "current": store.version(task), **knowledge.model_dump(),
                "history": store.history(task)}


def add(cfg: RunConfig, task: str, item_id: str | None, passage: str | None, question: str | None,
        answer: str | None, persona: str | None) -> int:
    kinds = [passage is not None, question is not None or answer is not None, persona is not None]
    if sum(kinds) != 1:
        raise InputError("mental add takes one of: --passage TEXT, --question Q --answer A, or --persona TEXT")
    p = e = None
    if passage is not None or question is not None or answer is not None:
        if not item_id:
            raise InputError("mental add: --id is needed for a passage or an experience")
        if passage is None and (not question or not answer):
            raise InputError("mental add: an experience needs both --question and --answer")
        try:
            if passage is not None:
                p = Passage(id=item_id, text=passage)
            else:
                e = Experience(id=item_id, question=question, answer=answer)
        except ValidationError as err:  # an empty text, an over-long id
            raise InputError(f"mental add: item {item_id!r}: " + "; ".join(
                f"{x['loc'][0]}: {x['msg']}" for x in err.errors())) from None
        # (a text of blanks is refused by the store's own validation when the version is written)
        too_big = over_budget([(p or e).item()], _budget(cfg), token_counter(cfg))
        if too_big:
            raise InputError(f"mental add: {too_big[0]}")
    with attach_redis(cfg) as url:
        return MentalStore(url, cfg.name).add(task, passage=p, experience=e, persona=persona)


def export(cfg: RunConfig, dest: str, tasks: list[str] | None) -> int:
    with attach_redis(cfg) as url:
        pack = MentalStore(url, cfg.name).export(tasks or None)
    data = pack.model_dump()
    if dest.endswith(".jsonl"):
        text = pack_jsonl(pack)
    elif dest.endswith(".json"):
        text = json.dumps(data, indent=1, ensure_ascii=False)
    else:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=110)
    if dest == "-":
        sys.stdout.write(text)
    else:
        with open(dest, "w", encoding="utf-8") as f:
            f.write(text)
    return len(pack.tasks)


def format_show(out: dict) -> str:
    if "tasks" in out:
        if not out["tasks"]:
            return "the knowledge store is empty (backpack mental import CONFIG FILE)"
        return "\n".join(f"{t}: version {v}" for t, v in out["tasks"].items())
    lines = [f"task {out['task']}: version {out['version']} (current {out['current']})",
             f"persona: {out['persona'] or '(none)'}", f"passages ({len(out['passages'])}):"]
    lines += [f"  [{p['id']}] {p['text']}" for p in out["passages"]]
    lines.append(f"experiences ({len(out['experiences'])}):")
    lines += [f"  [{e['id']}] Q: {e['question']}\n      A: {e['answer']}" for e in out["experiences"]]
    lines.append("history:")
    lines += [f"  v{h['version']}: {h['passages']} passage(s), {h['experiences']} experience(s) ({h['note']})"
              for h in out["history"]]
    return "\n".join(lines)
