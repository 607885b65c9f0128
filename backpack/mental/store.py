"""The Mental Process store: each task's knowledge (persona, passages, experiences) in Redis, versioned.

Keys, under the run's prefix (`backpack:<run>:mental:`), so runs sharing a Redis never mix knowledge:

    tasks            hash: task name -> its current version (1, 2, ...)
    task:<name>:<N>  string: version N of the task as JSON {"knowledge": {...}, "hash", "at", "note"}

Every change writes a whole new version (a task is kilobytes) and moves the pointer in one transaction, so a
reader sees version N or N+1, never half of one; old versions stay, so a dataset row's `knowledge_version`
can always be looked up. Writing content identical to the current version makes no new version (importing
the same pack at every run start is free).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Optional

import redis

from backpack.config.knowledge import Experience, KnowledgePack, Passage, TaskKnowledge, parse_pack
from backpack.errors import InputError
from backpack.runtime.redis_server import RunRedis


class UnknownTaskError(InputError):
    """A task name that has no knowledge in the store."""


def knowledge_hash(k: TaskKnowledge) -> str:
    return hashlib.sha256(json.dumps(k.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


class MentalStore:
    """Versioned task knowledge of one run in Redis (picklable: it connects where it is used)."""

    def __init__(self, redis_url: str, run: str, password_env: Optional[str] = None):
        self.redis = RunRedis(redis_url, run, password_env)

    def k(self, *parts: str) -> str:
        """A key under the run's `mental:` prefix."""
        return self.redis.keys("mental", *parts)

    # ------------------------------------------------------------ reading

    def tasks(self) -> dict[str, int]:
        """Every task with knowledge, and its current version."""
        return {t: int(v) for t, v in sorted(self.redis.client.hgetall(self.k("tasks")).items())}

    def version(self, task: str) -> int:
        """The task's current version (0: the store has nothing for it)."""
        v = self.redis.client.hget(self.k("tasks"), task)
        return int(v) if v else 0

    def get(self, task: str, version: Optional[int] = None) -> tuple[TaskKnowledge, int]:
        """(knowledge, version) of `task` at `version` (None: current). UnknownTaskError names the known tasks."""
        v = version or self.version(task)
        raw = self.redis.client.get(self.k("task", task, str(v))) if v else None
        if raw is None:
            if not v:
                known = ", ".join(self.tasks()) or "none: import a pack with `backpack mental import`"
                raise UnknownTaskError(f"no knowledge for task {task!r} (tasks in the store: {known})")
            raise UnknownTaskError(f"task {task!r} has no version {v} (current: {self.version(task)})")
        return TaskKnowledge(**json.loads(raw)["knowledge"]), v

    def history(self, task: str) -> list[dict]:
        """Every version of `task`: version, when, note, and how many passages/experiences it held."""
        out = []
        for v in range(1, self.version(task) + 1):
            raw = self.redis.client.get(self.k("task", task, str(v)))
            if raw:
                rec = json.loads(raw)
                k = rec["knowledge"]
                out.append({"version": v, "at": rec["at"], "note": rec.get("note", ""),
                            "passages": len(k["passages"]), "experiences": len(k["experiences"])})
        return out

    def export(self, tasks: Optional[list[str]] = None) -> KnowledgePack:
        """The current knowledge of `tasks` (None: all) as a pack (write it with `pack.model_dump()`)."""
        names = tasks if tasks is not None else list(self.tasks())
        return KnowledgePack(tasks={t: self.get(t)[0] for t in names})

    # ------------------------------------------------------------ writing

    def put(self, task: str, knowledge: TaskKnowledge, note: str = "") -> tuple[int, bool]:
        """Make `knowledge` the task's current version: (version, changed). Validated like a pack file."""
        parse_pack({"tasks": {task: knowledge.model_dump()}}, f"task {task!r}")
        digest = knowledge_hash(knowledge)
        tasks_key = self.k("tasks")
        with self.redis.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(tasks_key)
                    cur = int(pipe.hget(tasks_key, task) or 0)
                    if cur:
                        raw = pipe.get(self.k("task", task, str(cur)))
                        if raw and json.loads(raw)["hash"] == digest:
                            pipe.unwatch()
                            return cur, False
                    new = cur + 1
                    record = {"knowledge": knowledge.model_dump(), "hash": digest, "at": time.time(), "note": note}
                    pipe.multi()
                    pipe.set(self.k("task", task, str(new)), json.dumps(record))
                    pipe.hset(tasks_key, task, new)
                    pipe.execute()
                    return new, True
                except redis.WatchError:
                    continue  # another writer moved the pointer: read again

    def import_pack(self, pack: KnowledgePack, note: str = "import") -> dict[str, tuple[int, bool]]:
        """Put every task of `pack`: {task: (version, changed)}."""
        return {name: self.put(name, k, note) for name, k in pack.tasks.items()}

    def add(self, task: str, passage: Optional[Passage] = None, experience: Optional[Experience] = None,
            persona: Optional[str] = None) -> int:
        """A new version of `task` with a passage or an experience added, or its persona replaced (a task that
        does not exist yet is created). An id already in the task is refused."""
        try:
            k, _ = self.get(task)
        except UnknownTaskError:
            k = TaskKnowledge()
        k = k.model_copy(deep=True)
        ids = {it.id for it in k.items()}
        note = []
        for item, where in ((passage, k.passages), (experience, k.experiences)):
            if item is not None:
                if item.id in ids:
                    raise InputError(f"task {task!r} already has an item with id {item.id!r}")
                where.append(item)
                note.append(f"add {item.id}")
        if persona is not None:
            k.persona = persona
            note.append("persona")
        version, _ = self.put(task, k, ", ".join(note))
        return version
