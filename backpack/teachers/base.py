"""The teacher protocol: what every backend is, and its Arrow edge.

A teacher answers a list of Queries with Completions (`answer`), one per sample. A Query it cannot answer (a
prompt longer than its context) comes back as a failed Completion; a failure of the whole batch raises
`TeacherError`. A Query that carries `score_ids` (a completion someone else wrote: on-policy distillation's
student samples) is scored, not answered: its one Completion holds those ids with the teacher's logprob of each
and, when `decoding.logprobs` is k > 0, its top-k at each position. Scoring goes through `answer` like writing,
so the batcher, the ledger, the scheduler's routing, retries and failed rows are the same for both; a backend
splits the two kinds with `split_scoring` and answers the scored ones with its `score`. Teachers are plain classes on plain objects: Arrow is the contract between actors, so a
teacher actor (`TeacherHost`) converts once at its edge, the Queries in and the Completions out, and the ledger,
the batcher and the model in between pass objects (`backpack.teachers.host`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import pyarrow as pa

from backpack.core.schema import completions_to_table, table_to_queries
from backpack.core.types import Completion, Query


@runtime_checkable
class Teacher(Protocol):
    name: str

    def answer(self, queries: list[Query]) -> list[Completion]:
        """Completions of `queries`, one per sample (a Query's samples in sample order)."""
        ...

    def info(self) -> dict:
        """backend, model source, fingerprint, device, context length."""
        ...


def split_scoring(queries: list[Query]) -> tuple[list[Query], list[Query]]:
    """(Queries to write an answer to, Queries whose `score_ids` are to be scored), each in the given order."""
    return [q for q in queries if not q.scoring], [q for q in queries if q.scoring]


def in_query_order(queries: list[Query], completions: list[Completion]) -> list[Completion]:
    """`completions` sorted by their Query's place in `queries`, a Query's samples kept in sample order."""
    order = {q.id: i for i, q in enumerate(queries)}
    return sorted(completions, key=lambda c: order[c.query_id])


def answer_table(teacher: Teacher, queries: pa.Table) -> pa.Table:
    """The Arrow edge of a teacher: a QUERY_SCHEMA table in, a DATASET_SCHEMA table out, one conversion each."""
    qs = table_to_queries(queries)
    return completions_to_table(qs, teacher.answer(qs))


class TeacherBase:
    """What every backend shares: `generate`, the Arrow edge for a teacher used on its own (tests, benchmarks)."""

    def generate(self, queries: pa.Table) -> pa.Table:
        """QUERY_SCHEMA table in, DATASET_SCHEMA table out."""
        return answer_table(self, queries)
