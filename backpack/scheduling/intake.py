"""The prompt intake of a continual run: a Redis stream that applications push Queries to.

Producers (`Intake.push`, `backpack ingest`) validate each prompt, then add it to the stream
`backpack:<run>:intake` in one atomic step with its de-duplication record: a prompt with the same content hash
(messages, task, decoding, teacher) as one already accepted is a duplicate and is not queued again (it is answered
once). The scheduler reads the stream through the consumer group `schedulers` (`IntakeSource`) and acknowledges
a prompt only after its Completion is in the DatasetStore, so a crash of the scheduler or a teacher leaves it
pending and it is delivered again. Acknowledged entries are deleted, so the stream's length is the backlog.

Redis keys (all under `backpack:<run>:`):
    intake             the stream (field `query`: the Query as JSON; `pushed_at`: unix time)
    intake:dedup       hash: content hash -> query id of the accepted prompt
    intake:ids         hash: query id -> content hash (one id is never reused for another prompt)
    intake:stats       hash: pushed, duplicates, answered, failed
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from backpack.core.schema import queries_to_table, table_to_queries
from backpack.core.types import DecodingParams, Query, query_id
from backpack.data.prompts import Rejected, parse_record
from backpack.errors import InputError
from backpack.runtime.redis_server import RunRedis

GROUP = "schedulers"

# Atomic accept: refuse an id reused for other content, skip a duplicate, else record and queue the prompt.
_PUSH = """
local known = redis.call('HGET', KEYS[3], ARGV[2])
if known and known ~= ARGV[1] then return {-1, known} end
local first = redis.call('HGET', KEYS[1], ARGV[1])
if first then
  redis.call('HINCRBY', KEYS[4], 'duplicates', 1)
  return {0, first}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[1])
redis.call('HINCRBY', KEYS[4], 'pushed', 1)
local sid = redis.call('XADD', KEYS[2], '*', 'query', ARGV[3], 'pushed_at', ARGV[4])
return {1, sid}
"""


def content_hash(q: Query) -> str:
    """What makes two prompts duplicates: messages, task, decoding and teacher (not the caller's id)."""
    return query_id(q.messages, q.task, q.decoding, q.teacher)


def encode_query(q: Query) -> str:
    return json.dumps({"id": q.id, "messages": q.messages, "task": q.task, "teacher": q.teacher,
                       "decoding": asdict(q.decoding)}, ensure_ascii=False)


def decode_query(raw: str) -> Query:
    d = json.loads(raw)
    return Query(messages=d["messages"], decoding=DecodingParams(**d["decoding"]), task=d["task"], id=d["id"],
                 teacher=d.get("teacher"))


def answered_prompts(table: pa.Table) -> dict[str, str]:
    """Query id -> content hash of each prompt with a successful row in `table` (DATASET_SCHEMA rows)."""
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    return {q.id: content_hash(q) for q in table_to_queries(ok)}


@dataclass
class PushResult:
    query_id: str        # the id the answer will be stored under (the first one's, for a duplicate)
    accepted: bool       # False: a duplicate of a prompt already accepted


class Intake(RunRedis):
    """The producer side: what an application uses to send the prompts it sees to a continual run.

    >>> intake = Intake("redis://:pw@127.0.0.1:6380/0", run="support-bot")
    >>> intake.push("How do I reset my password?", task="support")
    """

    def __init__(self, redis_url: str, run: str, decoding: Optional[DecodingParams] = None,
                 default_task: str = "default", max_chars: int = 32_000, password_env: Optional[str] = None,
                 caps: Optional[dict[str, int]] = None):
        super().__init__(redis_url, run, password_env)
        self.decoding = decoding or DecodingParams()
        self.default_task = default_task
        self.max_chars = max_chars
        # the most a pushed prompt's own decoding may ask for (default: the intake's decoding itself)
        self.caps = caps if caps is not None else {"max_new_tokens": self.decoding.max_new_tokens,
                                                   "n": self.decoding.n, "logprobs": self.decoding.logprobs}
        self._script = None

    def push(self, prompt: Optional[str] = None, *, messages: Optional[list[dict]] = None, task: Optional[str] = None,
             id: Optional[str] = None, teacher: Optional[str] = None, decoding: Optional[dict] = None) -> PushResult:
        """Validate and queue one prompt (a user message, or chat `messages`). Raises InputError naming what is
        wrong with it (empty, too long, bad messages or decoding, an id already used for another prompt)."""
        rec = {k: v for k, v in {"prompt": prompt, "messages": messages, "task": task, "id": id,
                                 "teacher": teacher, "decoding": decoding}.items() if v is not None}
        try:
            q = parse_record(rec, "prompt", self.default_task, self.decoding, self.max_chars, self.caps)
        except ValueError as e:
            raise InputError(str(e)) from None
        return self.push_query(q)

    def push_query(self, q: Query) -> PushResult:
        """Queue an already validated Query."""
        if self._script is None:
            self._script = self.client.register_script(_PUSH)
        k = self.keys
        code, value = self._script(keys=[k("intake", "dedup"), k("intake"), k("intake", "ids"), k("intake", "stats")],
                                   args=[content_hash(q), q.id, encode_query(q), f"{time.time():.6f}"])
        if int(code) < 0:
            raise InputError(f"prompt id {q.id!r} was already used for another prompt in run {self.run!r}: choose "
                             "a new id")
        return PushResult(q.id if int(code) == 1 else value, accepted=int(code) == 1)

    def claim_answered(self, prompts: dict[str, str]) -> None:
        """Record the run's already answered prompts (query id -> content hash, see answered_prompts), e.g. by
        a batch `generate`: a push of the same prompt is then a duplicate of the stored answer, and a push of
        another prompt under one of those ids is refused at once (not accepted, then dropped)."""
        ids, dedup = self.keys("intake", "ids"), self.keys("intake", "dedup")
        items = list(prompts.items())
        for i in range(0, len(items), 1000):
            pipe = self.client.pipeline(transaction=False)
            for qid, h in items[i:i + 1000]:
                pipe.hsetnx(ids, qid, h)
                pipe.hsetnx(dedup, h, qid)
            pipe.execute()

    def push_many(self, queries: list[Query]) -> tuple[int, int]:
        """Queue validated Queries; returns (accepted, duplicates). An id reused for another prompt raises."""
        accepted = sum(self.push_query(q).accepted for q in queries)
        return accepted, len(queries) - accepted


@dataclass
class Backlog:
    waiting: int       # pushed, not yet read by a scheduler
    in_progress: int   # read by a scheduler, answer not stored yet (delivered again after a crash)
    pushed: int
    duplicates: int
    answered: int
    failed: int


def backlog(redis_url: str, run: str, password_env: Optional[str] = None) -> Backlog:
    """The intake's counters, for `backpack status`."""
    r = RunRedis(redis_url, run, password_env)
    c, k = r.client, r.keys
    length = int(c.xlen(k("intake")))
    try:
        pending = int(c.xpending(k("intake"), GROUP)["pending"])
    except Exception:  # no group yet: no scheduler has read the stream
        pending = 0
    stats = {f: int(v) for f, v in c.hgetall(k("intake", "stats")).items()}
    return Backlog(waiting=max(0, length - pending), in_progress=pending, pushed=stats.get("pushed", 0),
                   duplicates=stats.get("duplicates", 0), answered=stats.get("answered", 0),
                   failed=stats.get("failed", 0))


class IntakeSource(RunRedis):
    """The scheduler's side of the stream. Picklable; used inside the scheduler actor.

    `fetch` hands out Queries to answer (first, on start, those this consumer had read but never acknowledged:
    the answers a crash lost); `stored(table)` is called once rows are in the DatasetStore and acknowledges (and
    deletes) their stream entries. A re-delivered prompt whose answer is already stored (a crash between storing
    and acknowledging) is acknowledged without being answered again.
    """

    def __init__(self, redis_url: str, run: str, answered: set[str] | dict[str, str], consumer: str = "scheduler",
                 password_env: Optional[str] = None, stored_ids: Optional[set[str]] = None):
        super().__init__(redis_url, run, password_env)
        self.consumer = consumer
        self.answered = set(answered)       # query ids with a stored successful Completion
        # Their content hashes where known (answered_prompts): a new entry under an answered id but with other
        # content is another prompt, and fails with a reason instead of being taken for the answered one.
        self.answered_hashes = dict(answered) if isinstance(answered, dict) else {}
        # Query ids with any stored row when this source was made: an entry re-delivered from this consumer's
        # own backlog (read before a crash) whose row is among them was stored, only its ack was lost. (A new
        # entry for a failed id is a re-push, and is answered again.)
        self.stored_ids = set(stored_ids or ()) | self.answered
        self._entries: dict[str, list[str]] = {}  # query id -> stream entry ids waiting for its answer
        self._hashes: dict[str, str] = {}
        self._own_pending_done = False
        self._cursor = "0"

    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.keys("intake"), GROUP, id="0", mkstream=True)
        except Exception as e:
            if "BUSYGROUP" not in str(e):
                raise

    def stop_requested(self) -> bool:
        return self.client.get(self.keys.stop) == "1"

    def fetch(self, max_rows: int, block_ms: int = 0) -> tuple[list[Query], list[Rejected]]:
        """Up to `max_rows` new Queries (blocking up to `block_ms` when none is waiting), and the stream
        entries that could not be read as Queries (to be stored as failed rows)."""
        count, entries, replay = max(1, max_rows), [], False
        if not self._own_pending_done:
            # First the entries delivered to this consumer before a crash and never acknowledged.
            self._ensure_group()
            resp = self.client.xreadgroup(GROUP, self.consumer, {self.keys("intake"): self._cursor}, count=count)
            entries = resp[0][1] if resp else []
            replay = bool(entries)
            if entries:
                self._cursor = entries[-1][0]
            if len(entries) < count:
                self._own_pending_done = True
        if not entries:
            resp = self.client.xreadgroup(GROUP, self.consumer, {self.keys("intake"): ">"}, count=count,
                                          block=block_ms or None)
            entries = resp[0][1] if resp else []
        queries, rejected, done, forget = [], [], [], []
        for sid, fields in entries:
            if not fields:  # an entry deleted after delivery: nothing left to answer
                done.append(sid)
                continue
            try:
                q = decode_query(fields["query"])
                queries_to_table([q])  # the teachers' batch type: a malformed entry fails here, not in the scheduler
            except Exception as e:  # noqa: BLE001 - whatever is wrong with it, it becomes a failed row
                bad = Query(messages=[{"role": "user", "content": str(fields)[:2000]}], id=f"rejected:intake:{sid}")
                if replay and bad.id in self.stored_ids:
                    done.append(sid)  # its failed row was stored before a crash lost the acknowledgement
                    continue
                rejected.append(Rejected(bad, f"intake entry {sid} is not a Backpack query: "
                                              f"{type(e).__name__}: {e}"))
                self._entries[bad.id] = [sid]
                continue
            if q.id in self.answered and self.answered_hashes.get(q.id, content_hash(q)) != content_hash(q):
                bad = Query(messages=q.messages, task=q.task, decoding=q.decoding, id=f"rejected:intake:{sid}")
                if not (replay and bad.id in self.stored_ids):
                    rejected.append(Rejected(bad, f"prompt id {q.id!r} already names another, answered prompt in "
                                                  "this run's dataset: push it under a new id"))
                    self._entries[bad.id] = [sid]
                else:
                    done.append(sid)
                continue
            if q.id in self.answered or (replay and q.id in self.stored_ids):
                done.append(sid)  # answered (or failed) before a crash lost the acknowledgement
                if q.id not in self.answered:  # failed: as stored() would have, let a re-push retry it
                    forget.append(content_hash(q))
                continue
            if q.id not in self._entries:
                queries.append(q)
                self._hashes[q.id] = content_hash(q)
            self._entries.setdefault(q.id, []).append(sid)
        if done:
            self._ack(done, forget)
        return queries, rejected

    def stored(self, table: pa.Table) -> None:
        """Acknowledge the stream entries of every query in `table` (rows now in the DatasetStore). A failed
        query's de-duplication record is dropped, so pushing the same prompt again retries it."""
        ids = table.column("query_id").to_pylist()
        status = dict(zip(ids, table.column("status").to_pylist()))
        sids, failed = [], []
        for qid, st in status.items():
            if st == "ok":  # a failed prompt may be pushed again (its dedup record goes): it must be retried
                self.answered.add(qid)
            sids += self._entries.pop(qid, [])
            h = self._hashes.pop(qid, None)
            if st != "ok" and h is not None:
                failed.append(h)
        pipe = self.client.pipeline(transaction=True)  # counters and acknowledgements change together
        if failed:
            pipe.hdel(self.keys("intake", "dedup"), *failed)
        ok = sum(1 for s in status.values() if s == "ok")
        pipe.hincrby(self.keys("intake", "stats"), "answered", ok)
        pipe.hincrby(self.keys("intake", "stats"), "failed", len(status) - ok)
        if sids:
            pipe.xack(self.keys("intake"), GROUP, *sids)
            pipe.xdel(self.keys("intake"), *sids)
        pipe.execute()

    def _ack(self, sids: list[str], forget: tuple[str, ...] | list[str] = ()) -> None:
        pipe = self.client.pipeline(transaction=True)
        if forget:
            pipe.hdel(self.keys("intake", "dedup"), *forget)
        pipe.xack(self.keys("intake"), GROUP, *sids)
        pipe.xdel(self.keys("intake"), *sids)
        pipe.execute()
