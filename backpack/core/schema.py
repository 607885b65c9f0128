"""The one Arrow schema that crosses actor boundaries and lands on disk.

A batch of Queries is a table with `QUERY_SCHEMA`; teachers answer with a table of `DATASET_SCHEMA` (the query
columns followed by the completion columns), one row per sample, and that same table is what the DatasetStore
writes as Parquet. Failed Queries are rows too (`status == "failed"`, `error` set), so nothing is lost silently.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict

import pyarrow as pa

from backpack.core.types import Completion, DecodingParams, Query

# 2: the recall columns (context, recalled_ids, knowledge_version); shards of version 1 read with them null.
# 3: score_ids and student_version (on-policy rows: a teacher's scores of a student's sample); older shards read
# with them null (rows the teacher wrote).
SCHEMA_VERSION = 3

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
DECODING_TYPE = pa.struct([
    ("max_new_tokens", pa.int32()),
    ("temperature", pa.float64()),
    ("top_k", pa.int32()),
    ("top_p", pa.float64()),
    ("repetition_penalty", pa.float64()),
    ("n", pa.int32()),
    ("seed", pa.int64()),
    ("logprobs", pa.int32()),
])

QUERY_FIELDS = [
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("messages", pa.list_(MESSAGE_TYPE), nullable=False),
    pa.field("decoding", DECODING_TYPE, nullable=False),
    pa.field("requested_teacher", pa.string()),
    # What recall put in front of the prompt for the teacher (null: nothing). Training uses `messages` only,
    # so the student learns to answer without it (context distillation).
    pa.field("context", pa.string()),
    pa.field("recalled_ids", pa.list_(pa.string())),
    pa.field("knowledge_version", pa.int64()),
    # On-policy rows: the completion (token ids) the teacher scored rather than wrote, and the student version
    # that sampled it (both null for answers the teacher wrote).
    pa.field("score_ids", pa.list_(pa.int32())),
    pa.field("student_version", pa.int64()),
]

COMPLETION_FIELDS = [
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("status", pa.string(), nullable=False),          # "ok" | "failed"
    pa.field("error", pa.string()),                            # why it failed (None when ok)
    pa.field("teacher", pa.string(), nullable=False),
    pa.field("replica", pa.string()),
    pa.field("model_fingerprint", pa.string()),
    pa.field("text", pa.string()),
    pa.field("finish_reason", pa.string()),                    # "stop" | "length" | "error"
    pa.field("prompt_tokens", pa.int32()),
    pa.field("completion_tokens", pa.int32()),
    pa.field("token_ids", pa.list_(pa.int32())),
    pa.field("token_logprobs", pa.list_(pa.float32())),       # logprob of each generated token
    pa.field("top_ids", pa.list_(pa.list_(pa.int32()))),      # [token][k] ids of the top-k alternatives
    pa.field("top_logprobs", pa.list_(pa.list_(pa.float32()))),  # [token][k] their logprobs
    pa.field("latency_s", pa.float64()),
    pa.field("created_at", pa.timestamp("ms", tz="UTC")),
]

QUERY_SCHEMA = pa.schema(QUERY_FIELDS, metadata={"backpack_schema_version": str(SCHEMA_VERSION)})
DATASET_SCHEMA = pa.schema(QUERY_FIELDS + COMPLETION_FIELDS,
                           metadata={"backpack_schema_version": str(SCHEMA_VERSION)})


def _query_row(q: Query) -> dict:
    return {
        "query_id": q.id,
        "task": q.task,
        "messages": [{"role": m["role"], "content": m["content"]} for m in q.messages],
        "decoding": asdict(q.decoding),
        "requested_teacher": q.teacher,
        "context": q.context,
        "recalled_ids": list(q.recalled_ids),
        "knowledge_version": q.knowledge_version,
        "score_ids": None if q.score_ids is None else list(q.score_ids),
        "student_version": q.student_version,
    }


def queries_to_table(queries: list[Query]) -> pa.Table:
    """Queries -> a `QUERY_SCHEMA` table (the batch type sent to teachers)."""
    return pa.Table.from_pylist([_query_row(q) for q in queries], schema=QUERY_SCHEMA)


def table_to_queries(table: pa.Table) -> list[Query]:
    """A table holding at least the query columns -> Queries (ids preserved)."""
    out = []
    for row in table.select([f.name for f in QUERY_FIELDS]).to_pylist():
        out.append(Query(messages=row["messages"], decoding=DecodingParams(**row["decoding"]), task=row["task"],
                         id=row["query_id"], teacher=row["requested_teacher"], context=row["context"],
                         recalled_ids=list(row["recalled_ids"] or []),
                         knowledge_version=row["knowledge_version"], score_ids=row["score_ids"],
                         student_version=row["student_version"]))
    return out


def completions_to_table(queries: list[Query], completions: list[Completion]) -> pa.Table:
    """Join each Completion with its Query into a `DATASET_SCHEMA` table, one row per Completion."""
    by_id = {q.id: q for q in queries}
    now = _dt.datetime.now(_dt.timezone.utc)
    rows = []
    for c in completions:
        row = _query_row(by_id[c.query_id])
        row.update(
            sample_index=c.sample_index, status=c.status, error=c.error, teacher=c.teacher, replica=c.replica,
            model_fingerprint=c.model_fingerprint, text=c.text, finish_reason=c.finish_reason,
            prompt_tokens=c.prompt_tokens, token_ids=c.token_ids,
            completion_tokens=c.tokens_generated,
            token_logprobs=c.token_logprobs, top_ids=c.top_ids, top_logprobs=c.top_logprobs,
            latency_s=c.latency_s, created_at=now,
        )
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=DATASET_SCHEMA)


def failed_table(queries_table: pa.Table, teacher: str, error: str, replica: str = "") -> pa.Table:
    """Every Query in `queries_table` reported failed with `error` (used when no teacher could answer)."""
    queries = table_to_queries(queries_table)
    return completions_to_table(queries, [Completion.failed(q.id, teacher, error, replica) for q in queries])


# Columns added after schema version 1: a table without them gets them as nulls (older shards stay readable).
_ADDED = ("context", "recalled_ids", "knowledge_version", "score_ids", "student_version")


def with_added_columns(table: pa.Table, schema: pa.Schema = DATASET_SCHEMA) -> pa.Table:
    """`table` with the columns added since schema version 1 filled with nulls where it lacks them."""
    for name in _ADDED:
        if name not in table.column_names and name in schema.names:
            table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
    return table


def check_dataset_table(table: pa.Table) -> pa.Table:
    """Cast a table to `DATASET_SCHEMA`, raising ValueError naming the columns that do not fit."""
    missing = [n for n in DATASET_SCHEMA.names if n not in table.column_names]
    extra = [n for n in table.column_names if n not in DATASET_SCHEMA.names]
    if missing or extra:
        raise ValueError(f"table does not match the dataset schema: missing {missing}, unexpected {extra}")
    return table.select(DATASET_SCHEMA.names).cast(DATASET_SCHEMA)
