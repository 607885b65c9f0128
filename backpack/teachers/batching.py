"""Dynamic batching: many callers' small Arrow tables gathered into one call of a model.

A teacher actor that several scheduler calls reach at once (a threaded Ray actor) would otherwise run each
call's few Queries as its own small model batch. `DynamicBatcher` sits between the callers and the model: each
caller blocks in `submit(table)`, one worker thread gathers the waiting tables, calls `fn` once on their
concatenation, and hands each caller back exactly the rows of its own Queries (matched by `query_id`).

When a gathered batch runs (callers are taken in arrival order; one caller's table is never split):

1. it is full: it holds `max_rows` rows, or the next waiting caller cannot join it (its rows would pass
   `max_rows`, its schema differs, or it shares a query id with the batch). A first caller larger than
   `max_rows` runs alone;
2. its oldest caller has waited `max_wait_s`, counted from its arrival. Callers that arrived while the model was
   busy have usually waited that long already, so they run the moment the model is free: the wait only ever
   delays a caller that found the model idle, the one case where waiting can gather company;
3. `max_callers` callers are waiting: when the callers know they are at most that many at once (the scheduler's
   `max_in_flight` per replica), nobody else can come, so waiting longer only adds latency;
4. the batcher is closing: what was submitted before `close()` still runs, without waiting.

Pure Python and pyarrow (no Ray, no torch), so it is tested in-process with a fake `fn`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable, Optional

import pyarrow as pa


class BatcherClosed(RuntimeError):
    """`submit` after `close()`."""


class _Request:
    __slots__ = ("table", "ids", "arrived", "answer")

    def __init__(self, table: pa.Table, ids: list, arrived: float):
        self.table, self.ids, self.arrived = table, ids, arrived
        self.answer: Future = Future()


class DynamicBatcher:
    """Gathers tables submitted from many threads into calls of `fn` (see the module docstring for when).

    `fn` takes the concatenated tables and returns a table with a `key` column (default `query_id`) whose
    values are those of its input: any number of rows per input key (n samples of a Query, say). `fn` is only
    ever called from the batcher's one worker thread, so it needs no locking of its own.
    """

    def __init__(self, fn: Callable[[pa.Table], pa.Table], max_rows: int, max_wait_s: float,
                 max_callers: Optional[int] = None, key: str = "query_id", name: str = "batcher"):
        if max_rows < 1 or max_wait_s < 0 or (max_callers is not None and max_callers < 1):
            raise ValueError(f"bad batcher limits: max_rows={max_rows}, max_wait_s={max_wait_s}, "
                             f"max_callers={max_callers}")
        self.fn, self.key = fn, key
        self.max_rows, self.max_wait_s, self.max_callers = max_rows, max_wait_s, max_callers
        self.stats = {"calls": 0, "batches": 0, "rows": 0}   # submits, fn calls, rows through fn
        self._waiting: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, table: pa.Table) -> pa.Table:
        """`fn`'s rows for the keys of `table`, in the order of their first appearance in `table` (a key's
        rows keep `fn`'s order). Blocks until its gathered batch has run; raises what `fn` raised for it."""
        req = _Request(table, table.column(self.key).to_pylist(), time.monotonic())
        with self._cond:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            self._waiting.append(req)
            self.stats["calls"] += 1
            self._cond.notify_all()
        # One exception object may reach several callers: concurrent.futures raises it in each waiter alike.
        return req.answer.result()

    def close(self, timeout: Optional[float] = None) -> None:
        """Refuse new tables, run the ones already submitted, and stop the worker (waiting up to `timeout`)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        while True:
            batch = self._gather()
            if not batch:
                return  # closed, nothing left
            self._run(batch)

    def _gather(self) -> list[_Request]:
        """Wait for a batch that is due (rules 1-4 of the module docstring) and take it off the queue."""
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            while self._waiting:
                n, rows = self._joinable()
                full = n < len(self._waiting) or rows >= self.max_rows
                everyone = self.max_callers is not None and len(self._waiting) >= self.max_callers
                left = self._waiting[0].arrived + self.max_wait_s - time.monotonic()
                if full or everyone or left <= 0 or self._closed:
                    return [self._waiting.popleft() for _ in range(n)]
                self._cond.wait(left)
            return []

    def _joinable(self) -> tuple[int, int]:
        """How many callers at the head of the queue fit in one batch (at least the first), and their rows."""
        first = self._waiting[0]
        rows, ids = first.table.num_rows, set(first.ids)
        n = 1
        for req in list(self._waiting)[1:]:
            if (rows + req.table.num_rows > self.max_rows or not req.table.schema.equals(first.table.schema)
                    or not ids.isdisjoint(req.ids)):
                break
            rows += req.table.num_rows
            ids.update(req.ids)
            n += 1
        return n, rows

    def _run(self, batch: list[_Request]) -> None:
        tables = [r.table for r in batch]
        try:
            # Same schema (metadata aside): concat keeps the first table's metadata.
            out = self.fn(tables[0] if len(tables) == 1 else pa.concat_tables(tables))
            parts = _split(out, self.key, [r.ids for r in batch])
        except BaseException as e:  # every caller of this batch gets the failure (the scheduler retries them)
            for req in batch:
                req.answer.set_exception(e)
            return
        finally:
            self.stats["batches"] += 1
            self.stats["rows"] += sum(t.num_rows for t in tables)
        for req, part in zip(batch, parts):
            req.answer.set_result(part)


def _split(out: pa.Table, key: str, ids_per_caller: list[list]) -> list[pa.Table]:
    """`out`'s rows per caller: those whose key the caller sent, ordered as the caller's keys (stable)."""
    where: dict = {}
    for caller, ids in enumerate(ids_per_caller):
        for pos, k in enumerate(ids):
            where.setdefault(k, (caller, pos))
    picks: list[list[tuple[int, int]]] = [[] for _ in ids_per_caller]
    for row, k in enumerate(out.column(key).to_pylist()):
        if k in where:
            caller, pos = where[k]
            picks[caller].append((pos, row))
    return [out.take([row for _, row in sorted(p)]) for p in picks]

