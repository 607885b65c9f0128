"""Dynamic batching: many callers' few Queries gathered into one call of a model.

A teacher actor that several scheduler calls reach at once (a threaded Ray actor) would otherwise run each
call's few Queries as its own small model batch. `DynamicBatcher` sits between the callers and the model: each
caller blocks in `submit(queries)`, one worker thread gathers the waiting callers' Queries, calls `fn` once on
all of them, and hands each caller back exactly the answers to its own Queries (matched by query id).

When a gathered batch runs (callers are taken in arrival order; one caller's Queries are never split):

1. it is full: it holds `max_rows` Queries, or the next waiting caller cannot join it (its Queries would pass
   `max_rows`, or it shares a query id with the batch: its answers would be ambiguous). A first caller larger
   than `max_rows` runs alone;
2. its oldest caller has waited `max_wait_s`, counted from its arrival. Callers that arrived while the model was
   busy have usually waited that long already, so they run the moment the model is free: the wait only ever
   delays a caller that found the model idle, the one case where waiting can gather company;
3. `max_callers` callers are waiting: when the callers know they are at most that many at once (the scheduler's
   `max_in_flight` per replica), nobody else can come, so waiting longer only adds latency;
4. the batcher is closing: what was submitted before `close()` still runs, without waiting.

Pure Python (no Ray, no torch), so it is tested in-process with a fake `fn`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from operator import attrgetter
from typing import Callable, Optional


class BatcherClosed(RuntimeError):
    """`submit` after `close()`."""


class _Request:
    __slots__ = ("items", "ids", "arrived", "answer")

    def __init__(self, items: list, ids: list, arrived: float):
        self.items, self.ids, self.arrived = items, ids, arrived
        self.answer: Future = Future()


class DynamicBatcher:
    """Gathers lists submitted from many threads into calls of `fn` (see the module docstring for when).

    `fn` takes the callers' items (Queries) in one list and returns answers (Completions), any number per item
    (n samples of a Query, say): `key` gives an item's id, `answer_key` the id of the item an answer is for. `fn`
    is only ever called from the batcher's one worker thread, so it needs no locking of its own.
    """

    def __init__(self, fn: Callable[[list], list], max_rows: int, max_wait_s: float,
                 max_callers: Optional[int] = None, key: Callable = attrgetter("id"),
                 answer_key: Callable = attrgetter("query_id"), name: str = "batcher"):
        if max_rows < 1 or max_wait_s < 0 or (max_callers is not None and max_callers < 1):
            raise ValueError(f"bad batcher limits: max_rows={max_rows}, max_wait_s={max_wait_s}, "
                             f"max_callers={max_callers}")
        self.fn, self.key, self.answer_key = fn, key, answer_key
        self.max_rows, self.max_wait_s, self.max_callers = max_rows, max_wait_s, max_callers
        self.stats = {"calls": 0, "batches": 0, "rows": 0}   # submits, fn calls, items through fn
        self._waiting: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, items: list) -> list:
        """`fn`'s answers to `items`, in the order of the items (an item's answers keep `fn`'s order). Blocks
        until its gathered batch has run; raises what `fn` raised for it."""
        req = _Request(items, [self.key(x) for x in items], time.monotonic())
        with self._cond:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            self._waiting.append(req)
            self.stats["calls"] += 1
            self._cond.notify_all()
        # One exception object may reach several callers: concurrent.futures raises it in each waiter alike.
        return req.answer.result()

    def close(self, timeout: Optional[float] = None) -> None:
        """Refuse new submits, run the ones already waiting, and stop the worker (waiting up to `timeout`)."""
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
        """How many callers at the head of the queue fit in one batch (at least the first), and their items."""
        first = self._waiting[0]
        rows, ids = len(first.items), set(first.ids)
        n = 1
        for req in list(self._waiting)[1:]:
            if rows + len(req.items) > self.max_rows or not ids.isdisjoint(req.ids):
                break
            rows += len(req.items)
            ids.update(req.ids)
            n += 1
        return n, rows

    def _run(self, batch: list[_Request]) -> None:
        items = [x for r in batch for x in r.items]
        try:
            out = self.fn(items)
            parts = _split(out, self.answer_key, [r.ids for r in batch])
        except BaseException as e:  # every caller of this batch gets the failure (the scheduler retries them)
            for req in batch:
                req.answer.set_exception(e)
            return
        finally:
            self.stats["batches"] += 1
            self.stats["rows"] += len(items)
        for req, part in zip(batch, parts):
            req.answer.set_result(part)


def _split(out: list, key: Callable, ids_per_caller: list[list]) -> list[list]:
    """`out`'s answers per caller: those to the items the caller sent, ordered as the caller's items (stable)."""
    where: dict = {}
    for caller, ids in enumerate(ids_per_caller):
        for pos, k in enumerate(ids):
            where.setdefault(k, (caller, pos))
    picks: list[list[tuple[int, int]]] = [[] for _ in ids_per_caller]
    for row, k in enumerate(key(x) for x in out):
        if k in where:
            caller, pos = where[k]
            picks[caller].append((pos, row))
    return [[out[row] for _, row in sorted(p)] for p in picks]

