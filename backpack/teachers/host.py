"""What runs in a teacher actor: the teacher its config names, behind dynamic batching and the query ledger.

`TeacherHost` is the plain class `backpack/run/actors.py` makes an actor of; its `generate` is the actor's call:
the Queries of an Arrow table in, through the ledger, the batcher and the model as objects, a table out.
"""

from __future__ import annotations

import pyarrow as pa

from backpack.config import TeacherConfig
from backpack.core.types import Completion, Query
from backpack.teachers.base import Teacher, TeacherBase, answer_table


def build_teacher(cfg: TeacherConfig, replica: str = "") -> Teacher:
    """Construct the teacher for `cfg.backend` (hf, vllm, openai)."""
    if cfg.backend == "hf":
        from backpack.teachers.hf import HFTeacher

        return HFTeacher(cfg, replica=replica)
    if cfg.backend == "vllm":
        from backpack.teachers.vllm import VLLMTeacher

        return VLLMTeacher(cfg, replica=replica)
    if cfg.backend == "openai":
        from backpack.teachers.openai import OpenAITeacher

        return OpenAITeacher(cfg, replica=replica)
    raise NotImplementedError(f"teacher backend {cfg.backend!r} is not built in this version")


class BatchingTeacher(TeacherBase):
    """A teacher whose concurrent `answer` calls share model batches (a `DynamicBatcher` over its answer).

    Only the batcher's worker thread calls the inner teacher, so a model that is not thread-safe is safe here.
    Sits under the ledger: each caller asks the ledger on its own thread, only what is left is batched.
    """

    def __init__(self, teacher: Teacher, cfg: TeacherConfig):
        from backpack.teachers.batching import DynamicBatcher

        self.teacher, self.name = teacher, teacher.name
        self.replica = getattr(teacher, "replica", teacher.name)
        # max_callers: the scheduler keeps at most max_in_flight calls at a replica; once all of them wait,
        # no one else can join, so the batch runs without waiting out max_batch_wait_ms.
        self.batcher = DynamicBatcher(teacher.answer, max_rows=cfg.batch_size,
                                      max_wait_s=cfg.max_batch_wait_ms / 1000, max_callers=cfg.max_in_flight,
                                      name=f"batcher-{self.replica}")

    def answer(self, queries: list[Query]) -> list[Completion]:
        return self.batcher.submit(queries)

    def info(self) -> dict:
        s = self.batcher.stats
        return {**self.teacher.info(), "batched_calls": s["calls"], "model_batches": s["batches"]}

    def close(self) -> None:
        self.batcher.close()


class TeacherHost:
    """What runs inside a teacher actor: builds the teacher for its config and answers for it.

    Kept separate from the backends so every backend gets the same actor surface (`ready`, `generate`,
    `peak_memory`) without knowing about Ray. With dynamic batching (`cfg.dynamic_batching()`) the actor is
    threaded (backpack/run/actors.py): several `generate` calls wait in the batcher at once, and `ready` / `peak_memory`
    answer meanwhile.
    """

    def __init__(self, cfg: TeacherConfig, replica: str = "", ledger=None):
        self.teacher = build_teacher(cfg, replica)
        self.batching = BatchingTeacher(self.teacher, cfg) if cfg.dynamic_batching() else None
        if self.batching is not None:
            self.teacher = self.batching
        if ledger is not None:  # answers already paid for come from the query ledger (backpack/teachers/ledger.py)
            from backpack.teachers.ledger import LedgerTeacher

            self.teacher = LedgerTeacher(self.teacher, ledger)

    def ready(self) -> dict:
        """The teacher's info once its model is loaded, with the Ray node it runs on (placement is visible)."""
        import os

        info = dict(self.teacher.info(), pid=os.getpid())  # the process to look at (or kill, in a test)
        try:
            import ray

            if ray.is_initialized():
                info["node"] = ray.get_runtime_context().get_node_id()
        except ImportError:  # a plain in-process host in a unit test
            pass
        return info

    def generate(self, queries: pa.Table) -> pa.Table:
        """The actor's call: the Queries of a table answered, as a table (Arrow only at this edge)."""
        return answer_table(self.teacher, queries)

    def close(self) -> None:
        """Stop the batcher's thread, if any (an in-process host; an actor just ends with its process)."""
        if self.batching is not None:
            self.batching.close()

    def peak_memory(self) -> int:
        """Peak resident memory of this process in bytes."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
