"""The teacher protocol and the factory that builds a teacher from its config.

A teacher takes a batch of Queries as an Arrow table (`QUERY_SCHEMA`) and returns a table of Completions
(`DATASET_SCHEMA`), one row per sample. A Query it cannot answer (a prompt longer than its context) comes back
as a failed row; a failure of the whole batch raises `TeacherError`. Teachers are plain classes: `actors.py`
turns them into Ray actors.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import pyarrow as pa

from backpack.core.config import TeacherConfig


@runtime_checkable
class Teacher(Protocol):
    name: str

    def generate(self, queries: pa.Table) -> pa.Table:
        """QUERY_SCHEMA table in, DATASET_SCHEMA table out."""
        ...

    def info(self) -> dict:
        """backend, model source, fingerprint, device, context length."""
        ...


def build_teacher(cfg: TeacherConfig, replica: str = "") -> Teacher:
    """Construct the teacher for `cfg.backend` (hf, openai). The `vllm` backend plugs in here."""
    if cfg.backend == "hf":
        from backpack.teachers.hf import HFTeacher

        return HFTeacher(cfg, replica=replica)
    if cfg.backend == "openai":
        from backpack.teachers.openai import OpenAITeacher

        return OpenAITeacher(cfg, replica=replica)
    raise NotImplementedError(f"teacher backend {cfg.backend!r} is not built in this version")


class TeacherHost:
    """What runs inside a teacher actor: builds the teacher for its config and answers for it.

    Kept separate from the backends so every backend gets the same actor surface (`ready`, `generate`,
    `peak_memory`) without knowing about Ray.
    """

    def __init__(self, cfg: TeacherConfig, replica: str = "", ledger=None):
        self.teacher = build_teacher(cfg, replica)
        if ledger is not None:  # answers already paid for come from the query ledger (backpack/ledger.py)
            from backpack.ledger import LedgerTeacher

            self.teacher = LedgerTeacher(self.teacher, ledger)

    def ready(self) -> dict:
        """The teacher's info once its model is loaded, with the Ray node it runs on (placement is visible)."""
        info = dict(self.teacher.info())
        try:
            import ray

            if ray.is_initialized():
                info["node"] = ray.get_runtime_context().get_node_id()
        except ImportError:  # a plain in-process host in a unit test
            pass
        return info

    def generate(self, queries: pa.Table) -> pa.Table:
        return self.teacher.generate(queries)

    def peak_memory(self) -> int:
        """Peak resident memory of this process in bytes."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
