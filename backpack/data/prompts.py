"""Reading prompt collections (JSONL or Parquet) into Queries.

A record is `{"prompt": "..."}` or `{"messages": [{"role": ..., "content": ...}, ...]}`, with optional `id`,
`task`, `teacher` (route to that teacher only), `system` (a system prompt for `prompt` records) and
`decoding` (per-prompt overrides of the run's decoding fields). A record that cannot be used (not UTF-8, not
JSON, empty, too long, bad fields) does not stop the run: it becomes a `Rejected` entry that the run records as
a failed row, naming the reason and the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from backpack.core.types import DecodingParams, Query, query_id
from backpack.errors import InputError

ROLES = ("system", "user", "assistant")
_DECODING_FIELDS = set(DecodingParams.__dataclass_fields__)
# Where a synthesized prompt came from (backpack/run/synthesize.py): read with the prompt, not sent
PROVENANCE_FIELDS = {"source", "seed_ids", "written_by", "round", "reply_id"}


@dataclass
class Rejected:
    """A prompt record that was not sent to any teacher, and why."""

    query: Query        # as much of the record as could be read (id, task, messages)
    reason: str


def parse_record(rec, where: str, default_task: str, decoding: DecodingParams, max_chars: int,
                 caps: Optional[dict[str, int]] = None) -> Query:
    """One decoded record -> Query, or raise ValueError with a message naming the problem."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    unknown = set(rec) - {"id", "task", "prompt", "messages", "teacher", "system", "decoding"} - PROVENANCE_FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
    try:  # JSON may spell a lone surrogate (\ud800) that no UTF-8 store, Arrow column or Redis stream takes
        json.dumps(rec, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where}: holds text that is not valid Unicode (a lone surrogate)") from None
    except (RecursionError, ValueError):
        raise ValueError(f"{where}: not a prompt record (nested too deeply, or not JSON-able)") from None
    if ("prompt" in rec) == ("messages" in rec):
        raise ValueError(f"{where}: needs exactly one of 'prompt' or 'messages'")
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str):
            raise ValueError(f"{where}: 'prompt' must be a string")
        messages = [{"role": "user", "content": rec["prompt"]}]
        if rec.get("system"):
            messages.insert(0, {"role": "system", "content": str(rec["system"])})
    else:
        messages = rec["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: messages[{j}] must be {{'role': one of {ROLES}, 'content': str}}")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if messages[-1]["role"] != "user":
            raise ValueError(f"{where}: the last message must be from the user")
    if not messages[-1]["content"].strip():
        raise ValueError(f"{where}: empty prompt")
    total = sum(len(m["content"]) for m in messages)
    if total > max_chars:
        raise ValueError(f"{where}: prompt is {total} characters, over the limit of {max_chars} (prompts.max_chars)")
    dec = decoding
    if rec.get("decoding") is not None:
        over = rec["decoding"]
        if not isinstance(over, dict) or set(over) - _DECODING_FIELDS:
            raise ValueError(f"{where}: 'decoding' may only set {sorted(_DECODING_FIELDS)}")
        from backpack.config import DecodingConfig  # validated with the same bounds as the run config
        try:
            dec = DecodingConfig(**{**vars(decoding), **over}).params()
        except Exception as e:  # pydantic ValidationError -> one line
            raise ValueError(f"{where}: bad 'decoding': {str(e).splitlines()[1:3]}") from None
        for name, cap in (caps or {}).items():
            if name in over and getattr(dec, name) > cap:
                raise ValueError(f"{where}: decoding.{name}={getattr(dec, name)} is over this run's limit of {cap} "
                                 f"for a prompt's own decoding (prompts.override_max_{name.replace('max_', '')})")
    task = rec.get("task") or default_task
    teacher = rec.get("teacher")
    qid = str(rec["id"]) if rec.get("id") not in (None, "") else query_id(messages, task, dec, teacher)
    return Query(messages=messages, decoding=dec, task=str(task), id=qid, teacher=teacher)


def _jsonl_records(data: bytes, name: str) -> Iterator[tuple[str, Optional[dict], Optional[str], Optional[str]]]:
    """Yields (where, record, error, raw_text) for each non-blank line."""
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{name} line {lineno}"
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield where, None, f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})", \
                raw.decode("utf-8", errors="replace")
            continue
        try:
            yield where, json.loads(text), None, text
        except json.JSONDecodeError as e:
            yield where, None, f"{where}: not valid JSON ({e.msg} at column {e.colno})", text
        except RecursionError:
            yield where, None, f"{where}: nested too deeply to be a prompt record", text[:2000]


def _parquet_records(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise InputError(f"cannot read prompt file {str(path)!r} as Parquet: {e}") from None
    for i, rec in enumerate(table.to_pylist()):
        rec = {k: v for k, v in rec.items() if v is not None}
        yield f"{path.name} row {i}", rec, None, None


def read_prompts(path: str | Path, decoding: DecodingParams, default_task: str = "default",
                 limit: Optional[int] = None, max_chars: int = 32_000,
                 caps: Optional[dict[str, int]] = None) -> tuple[list[Query], list[Rejected]]:
    """Read a prompt collection. Returns (queries to send, rejected records). Raises InputError only when the
    file as a whole is unusable (missing, unreadable, or holding no record at all). `caps`: the most a record's
    own decoding may set each field to (PromptsConfig.override_caps)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"prompt file not found: {str(path)!r}")
    if path.suffix.lower() == ".parquet":
        records = _parquet_records(path)
    else:
        records = _jsonl_records(path.read_bytes(), path.name)
    queries, rejected = _collect(records, decoding, default_task, limit, max_chars, caps)
    if not queries and not rejected:
        raise InputError(f"prompt file {str(path)!r} holds no prompts")
    return queries, rejected


def read_prompt_lines(data: bytes, name: str, decoding: DecodingParams, default_task: str = "default",
                      max_chars: int = 32_000, caps: Optional[dict[str, int]] = None
                      ) -> tuple[list[Query], list[Rejected]]:
    """Prompt records from JSONL bytes (e.g. standard input); `name` is how messages refer to the source."""
    return _collect(_jsonl_records(data, name), decoding, default_task, None, max_chars, caps)


def _collect(records, decoding: DecodingParams, default_task: str, limit: Optional[int],
             max_chars: int, caps: Optional[dict[str, int]] = None) -> tuple[list[Query], list[Rejected]]:
    queries: list[Query] = []
    rejected: list[Rejected] = []
    seen: set[str] = set()
    for where, rec, error, raw in records:
        if limit is not None and len(queries) + len(rejected) >= limit:
            break
        if error is None:
            try:
                q = parse_record(rec, where, default_task, decoding, max_chars, caps)
                if q.id in seen:
                    raise ValueError(f"{where}: duplicate id {q.id!r}")
                seen.add(q.id)
                queries.append(q)
                continue
            except ValueError as e:
                error = str(e)
        # Keep what we can of the bad record so the failure row says which prompt it was.
        content = raw if raw is not None else json.dumps(rec, ensure_ascii=False, default=str)
        rid = rec.get("id") if isinstance(rec, dict) and rec.get("id") else None
        bad_id = f"rejected:{rid}" if rid else f"rejected:{where}"
        rejected.append(Rejected(Query(messages=[{"role": "user", "content": content[:2000]}], decoding=decoding,
                                       task=default_task, id=bad_id), error))
    return queries, rejected
