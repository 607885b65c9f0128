"""Readying the Mental Process for a run: import the config's pack, check it against the budget and the
prompts, and build the Recaller the scheduler uses. Everything a user can get wrong fails here, before any
teacher loads, with one message naming it."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from backpack.config import RunConfig
from backpack.config.knowledge import PACK, KnowledgePack, load_pack
from backpack.errors import ConfigError, InputError
from backpack.mental.bm25 import Item
from backpack.mental.recall import Recaller, TokenCounter
from backpack.mental.store import MentalStore


def token_counter(cfg: RunConfig) -> TokenCounter:
    """The budget is counted in the first local teacher's tokens (what the context costs at the teacher); with
    only remote teachers, whose tokenizers are unknown here, in the student's (else the default model's)."""
    local = [t.model for t in cfg.teachers if t.backend == "hf"]
    return TokenCounter(local[0] if local else cfg.student.base if cfg.student else "default")


def over_budget(items: Iterable[Item], budget: int, count: Callable[[str], int]) -> list[str]:
    """A line for every item that could never be recalled: larger than the budget on its own."""
    return [f"{it.kind} {it.id!r} is {n} tokens, larger than the recall budget of {budget} (mental.budget): "
            f"split it or raise the budget" for it in items if (n := count(it.text)) > budget]


def check_budget(pack: KnowledgePack, budget: int, count: Callable[[str], int], source: str) -> None:
    """ConfigError naming every passage or experience of `pack` larger than the budget."""
    problems = [f"tasks.{name}: {line}" for name, task in pack.tasks.items()
                for line in over_budget(task.items(), budget, count)]
    if problems:
        raise ConfigError(source, problems, PACK)


def load_checked_pack(path: str, budget: int, count: Callable[[str], int]) -> KnowledgePack:
    """A pack file loaded, validated and checked against the budget: ready to import."""
    pack = load_pack(path)
    check_budget(pack, budget, count, path)
    return pack


def prepare_recall(cfg: RunConfig, redis_url: str, prompt_tasks: Optional[Iterable[str]] = None,
                   report: Callable[[str], None] = lambda s: None) -> Optional[Recaller]:
    """The run's Recaller (None when the config has no `mental:` section). Imports `mental.path` into the
    store (a new version only for tasks whose content changed). With `prompt_tasks` (a batch run), refuses a run
    in which no prompt's task has knowledge: that is a mistyped task name, not a wish to recall nothing."""
    mc = cfg.mental
    if mc is None:
        return None
    store = MentalStore(redis_url, cfg.name)
    count = token_counter(cfg)
    if mc.path is not None:
        pack = load_checked_pack(mc.path, mc.budget, count)
        for task, (version, changed) in store.import_pack(pack).items():
            report(f"knowledge of task {task!r}: version {version}" + (" (imported)" if changed else " (unchanged)"))
    versions = store.tasks()
    if not versions:
        raise InputError("mental: the knowledge store of this run is empty: set mental.path to a knowledge pack, "
                         "or import one with `backpack mental import CONFIG FILE`")
    if prompt_tasks is not None:
        tasks = set(prompt_tasks)
        if tasks and not tasks & set(versions):
            raise InputError(f"no prompt's task has knowledge: the prompts' tasks are {sorted(tasks)}, the "
                             f"knowledge store has {sorted(versions)} (check the prompts' 'task' fields and "
                             f"prompts.default_task)")
        missing = sorted(tasks - set(versions))
        if missing:
            report(f"no knowledge for task(s) {missing}: their prompts go to the teachers without recall")
    return Recaller(store, mc.budget, count, mc.max_items)
