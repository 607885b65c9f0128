"""The query scheduler: routes batches of Queries to teacher replicas and streams answers to the store.

A plain asyncio class. It sees replicas only through `ReplicaHandle` (a name, a teacher, limits, and an async
`submit(table) -> table`), so tests drive it in-process with fakes and `backpack/run/actors.py` runs it as a Ray actor over
teacher actors. Guarantees:

- at most `max_in_flight` batches are queued at each replica;
- a batch that fails is retried on another replica (up to `max_retries` times); a replica whose failure is
  fatal (its actor died) gets no more work; a batch that still fails is split in halves, each tried once
  more, so one bad Query fails alone;
- a Query that no replica could answer is written as a failed row with the last cause, never dropped;
- answers are appended to the sink (the DatasetStore) in shards of about `flush_rows` rows as they arrive;
- with a `recall`, each Query carries its task's recalled knowledge to the teacher (and into its row);
- with policy ensemble, each batch goes as one copy per asked teacher, pinned to it: a copy is retried, split
  and failed among that teacher's replicas only, and its outcome waits in an `EnsembleHold` (scheduling/ensemble.py)
  until every asked teacher has answered or failed its Queries; then their rows are written by `ensemble.keep`.
  A Query is failed only when every asked teacher failed it. A Query that names its teacher goes to that one
  alone. At most `max_pending` Queries have answers held: a teacher that runs ahead waits for the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Optional, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from backpack.config import EnsembleConfig, SchedulerConfig
from backpack.core.schema import completions_to_table, failed_table, queries_to_table
from backpack.core.types import OK, Completion
from backpack.errors import cause_of
from backpack.scheduling.ensemble import EnsembleHold, pick_teachers
from backpack.scheduling.routing import POLICIES, ReplicaView, can_ever_serve

log = logging.getLogger(__name__)


class ReplicaHandle(Protocol):
    name: str
    teacher: str
    batch_size: int
    max_in_flight: int
    # optional, for the routing policies (see scheduling/routing.py): tags, cost (per 1k tokens), rank (config order)

    def submit(self, queries: pa.Table) -> Awaitable[pa.Table]: ...

    def is_fatal(self, error: BaseException) -> bool:
        """True if the replica cannot serve again after `error` (e.g. its actor died)."""
        ...


class Sink(Protocol):
    def append(self, table: pa.Table): ...


class QuerySource(Protocol):
    """Where a streaming scheduler's Queries come from (`backpack.scheduling.intake.IntakeSource`)."""

    def fetch(self, max_rows: int, block_ms: int = 0) -> tuple[list, list]:
        """(Queries, Rejected records) newly available, waiting up to `block_ms` for some."""
        ...

    def stored(self, table: pa.Table) -> None:
        """These dataset rows are durably stored: their prompts may be acknowledged."""
        ...

    def stop_requested(self) -> bool: ...


class Progress(Protocol):
    def update(self, ok: int, failed: int, tokens: int) -> None: ...

    def replica_state(self, replica: str, state: str) -> None: ...


@dataclass
class _Batch:
    table: pa.Table
    teacher: Optional[str]
    attempts: int = 0
    exclude: set = field(default_factory=set)
    last_error: str = ""
    task: Optional[str] = None  # the one task of its Queries (policy by_task), else None
    copy: bool = False          # one teacher's copy of an ensemble batch: its outcome goes to the hold


def _view(r: ReplicaHandle, **state) -> ReplicaView:
    return ReplicaView(r.name, r.teacher, max_in_flight=r.max_in_flight, tags=tuple(getattr(r, "tags", ())),
                       cost=getattr(r, "cost", 0.0), rank=getattr(r, "rank", 0), **state)


@dataclass
class RunSummary:
    queries: int = 0
    ok_rows: int = 0
    failed_rows: int = 0
    tokens: int = 0
    retries: int = 0
    seconds: float = 0.0
    dead_replicas: dict = field(default_factory=dict)
    # Policy ensemble (ok_rows and failed_rows count the rows written, so keep all writes up to k x n ok rows
    # a Query): answers the keep rule did not keep (asked and paid for, not stored) and their completion tokens
    # (`tokens` counts stored rows only), and a teacher's failures of Queries another teacher answered (not
    # written, the Query being answered).
    ensemble_unkept_rows: int = 0
    ensemble_unkept_tokens: int = 0
    ensemble_teacher_failures: int = 0

    def as_dict(self) -> dict:
        return dict(vars(self))


def settings(sc: SchedulerConfig) -> dict:
    """The Scheduler's keyword arguments for a run's `scheduler:` section."""
    return dict(policy=sc.policy, max_retries=sc.max_retries, flush_rows=sc.flush_rows, flush_seconds=sc.flush_seconds,
                max_pending=sc.max_pending,
                ensemble=sc.ensemble_settings() if sc.policy == "ensemble" else None)


class Scheduler:
    """The query scheduler (see the module docstring). `settings(cfg.scheduler)` gives a run's keyword
    arguments."""

    def __init__(self, replicas: list[ReplicaHandle], sink: Sink, progress: Optional[Progress] = None,
                 policy: str = "round_robin", max_retries: int = 2, flush_rows: int = 64,
                 flush_seconds: float = 5.0, max_pending: int = 256, recall=None,
                 ensemble: Optional[EnsembleConfig] = None):
        if not replicas:
            raise ValueError("the scheduler needs at least one teacher replica")
        self.replicas = replicas
        self.views = [_view(r) for r in replicas]
        self.policy = POLICIES[policy]
        self.by_task = policy == "by_task"  # batches then hold one task each
        # policy ensemble: whom to ask and what to keep (None: another policy)
        self.ensemble = (ensemble or EnsembleConfig()) if policy == "ensemble" else None
        self._hold = EnsembleHold(self.ensemble.keep if self.ensemble else "all")
        self.max_retries = max_retries
        self.flush_rows = flush_rows
        self.sink = sink
        self.progress = progress
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._buffer_since = 0.0
        self._last = -1
        self.flush_seconds = flush_seconds
        self.max_pending = max_pending
        self._source: Optional[QuerySource] = None
        self._stop = False
        # The Mental Process (`backpack.mental.recall.Recaller`): fills each Query's recalled context as its
        # batch is formed, so a stream's prompts see the knowledge version current when they are read.
        self.recall = recall

    # ------------------------------------------------------------------ public

    async def run(self, queries: pa.Table) -> dict:
        """Answer every Query in `queries` (QUERY_SCHEMA); returns a summary dict once all are stored."""
        return await self._serve(queries, None)

    async def run_stream(self, source: QuerySource, poll_seconds: float = 1.0) -> dict:
        """Answer Queries from `source` (the intake stream) until a stop is requested (`request_stop`, or the
        source says so). Shards are written by size (`flush_rows`) or age (`flush_seconds`), and `source.stored`
        is told after each, so a prompt is acknowledged only once its answer is stored. At most `max_pending`
        fetched Queries wait unanswered (the rest stays in the stream). On stop, batches not yet sent stay
        unacknowledged (the next run answers them) and batches at a teacher are finished and stored."""
        return await self._serve(None, source, poll_seconds)

    def request_stop(self) -> None:
        """Ask `run_stream` to stop (callable while it runs: the scheduler actor is an async actor)."""
        self._stop = True

    def dead_replicas(self) -> list[str]:
        """Names of the replicas found dead (a fatal error), for the driver to respawn."""
        return [v.name for v in self.views if not v.alive]

    def replace_replica(self, replica: ReplicaHandle) -> None:
        """Put `replica` in the place of the replica of the same name (a respawned teacher actor): it gets work
        from now on; batches still out at the old one fail over as usual."""
        idx = next(i for i, r in enumerate(self.replicas) if r.name == replica.name)
        old = self.views[idx]
        self.replicas[idx] = replica
        self.views[idx] = _view(replica, in_flight=old.in_flight, served=old.served)
        if self.progress:
            self.progress.replica_state(replica.name, "alive")

    async def _serve(self, queries: Optional[pa.Table], source: Optional[QuerySource],
                     poll_seconds: float = 1.0) -> dict:
        t0 = time.perf_counter()
        summary = RunSummary(queries=queries.num_rows if queries is not None else 0)
        self._hold = EnsembleHold(self.ensemble.keep if self.ensemble else "all")
        pending = deque(self._batches(queries)) if queries is not None else deque()
        inflight: dict[asyncio.Task, tuple[int, _Batch]] = {}
        self._source = source
        stopping, next_stop_check = source is None, 0.0
        while True:
            if not stopping:
                if time.monotonic() >= next_stop_check:
                    next_stop_check = time.monotonic() + 0.5
                    stopping = self._stop or await asyncio.to_thread(source.stop_requested)
                if stopping:
                    pending.clear()  # not sent: left unacknowledged in the stream for the next run
                else:
                    await self._fetch(source, pending, inflight, summary, poll_seconds)
            self._flush_if_old()
            if not pending and not inflight:
                if stopping:
                    break
                continue
            for _ in range(len(pending)):
                if not any(v.alive and v.in_flight < v.max_in_flight for v in self.views) and inflight:
                    break  # every replica is full: wait for an answer instead of rescanning the queue
                batch = pending.popleft()
                if (batch.copy and self._hold.partial >= self.max_pending
                        and not self._hold.started(batch.table.column("query_id").to_pylist())):
                    pending.append(batch)  # enough answers held: finish their Queries before starting more
                    continue
                exclude = frozenset(batch.exclude)
                idx = self.policy(self.views, self._last, batch.teacher, exclude, task=batch.task)
                if idx is None:
                    if can_ever_serve(self.views, batch.teacher, exclude):
                        pending.append(batch)  # wait for room
                    elif batch.exclude and can_ever_serve(self.views, batch.teacher, frozenset()):
                        batch.exclude.clear()  # only replicas that failed it are left: let them try again
                        pending.append(batch)
                    elif source is not None and stopping:
                        pass  # stopping with no replica for it: left unacknowledged for the next run
                    elif source is not None and self._may_return(batch.teacher):
                        pending.append(batch)  # streaming: a dead replica is respawned (replace_replica)
                    else:
                        self._fail(batch, summary)
                    continue
                self._last = idx
                self.views[idx].in_flight += 1
                replica = self.replicas[idx]
                task = asyncio.ensure_future(self._call(replica, batch.table))
                inflight[task] = (idx, batch, replica)
            if not inflight:
                if pending:
                    await asyncio.sleep(0.2)  # nothing could be sent: wait for a replica to come back
                continue
            # Streaming: wake up now and then to read new prompts and to write shards that grew old.
            done, _ = await asyncio.wait(inflight, timeout=None if source is None else min(0.5, poll_seconds),
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                idx, batch, replica = inflight.pop(task)
                view = self.views[idx]
                view.in_flight -= 1
                err = task.exception()
                if err is None:
                    view.served += 1
                    self._answered(batch, task.result(), summary)
                    continue
                cause = cause_of(err)[:2000]
                log.warning("batch of %d failed on %s: %s", batch.table.num_rows, view.name, cause[:200])
                # (a late failure of a replica already replaced must not mark its successor dead)
                if replica.is_fatal(err) and view.alive and self.replicas[idx] is replica:
                    view.alive = False
                    summary.dead_replicas[view.name] = cause[:500]
                    if self.progress:
                        self.progress.replica_state(view.name, f"dead: {cause[:200]}")
                batch.attempts += 1
                batch.exclude.add(view.name)
                batch.last_error = f"replica {view.name}: {cause}"
                if batch.attempts > self.max_retries and batch.table.num_rows > 1:
                    # One bad Query must not sink its batch-mates: split, give each half one more try.
                    pending.extendleft(reversed(self._split(batch)))
                elif batch.attempts > self.max_retries:
                    self._fail(batch, summary)
                else:
                    summary.retries += 1
                    pending.appendleft(batch)
        # Nothing is left held in a batch run; a stopping stream writes the Queries some teacher answered (the
        # copies not sent are not waited for) and leaves the others in the stream.
        rest = self._hold.finish(complete=source is None)
        if rest is not None:
            self._emit(rest, summary)
        summary.ensemble_unkept_rows = self._hold.unkept_rows
        summary.ensemble_unkept_tokens = self._hold.unkept_tokens
        summary.ensemble_teacher_failures = self._hold.teacher_failures
        self._flush()
        summary.seconds = time.perf_counter() - t0
        return summary.as_dict()

    # ------------------------------------------------------------------ internals

    async def _fetch(self, source: QuerySource, pending: deque, inflight: dict, summary: RunSummary,
                     poll_seconds: float) -> None:
        # (an ensemble's Queries count once, in the hold, however many copies of them are out)
        waiting = (sum(b.table.num_rows for b in pending if not b.copy) + len(self._hold)
                   + sum(b.table.num_rows for _, b, _ in inflight.values() if not b.copy))
        room = self.max_pending - waiting
        if room <= 0:
            return  # backpressure: the stream holds the rest
        if pending or inflight:
            queries, rejected = source.fetch(room, 0)  # no blocking while there is work to move on
        else:  # idle: wait for prompts, but not past the moment the buffered answers must be written
            wait = poll_seconds
            if self._buffer:
                wait = min(wait, self._buffer_since + self.flush_seconds - time.monotonic())
            # At most 10 s in one blocking read: a Redis client's socket timeout must not cut it short.
            queries, rejected = await asyncio.to_thread(source.fetch, room, max(1, int(min(wait, 10.0) * 1000)))
        if rejected:
            self._emit(completions_to_table([r.query for r in rejected],
                                            [Completion.failed(r.query.id, "(none)", r.reason) for r in rejected]),
                       summary)
        if queries:
            summary.queries += len(queries)
            pending.extend(self._batches(queries_to_table(queries)))

    def _may_return(self, teacher: Optional[str]) -> bool:
        """Whether a replica of `teacher` (any, for None) exists, dead or alive: in a streaming run the driver
        respawns dead ones, so their batches wait instead of failing."""
        return any(teacher is None or v.teacher == teacher for v in self.views)

    def _flush_if_old(self) -> None:
        if self._source is not None and self._buffer and time.monotonic() - self._buffer_since >= self.flush_seconds:
            self._flush()

    @staticmethod
    async def _call(replica: ReplicaHandle, table: pa.Table) -> pa.Table:
        return await replica.submit(table)

    def _batches(self, queries: pa.Table) -> list[_Batch]:
        """Split Queries by requested teacher (and by task for policy by_task), then into batches of that
        teacher's batch size."""
        out = []
        if self.recall is not None:
            queries = self.recall.annotate(queries)
        teachers = queries.column("requested_teacher")
        for teacher in sorted(set(teachers.to_pylist()), key=lambda t: (t is not None, t or "")):
            mask = pc.is_null(teachers) if teacher is None else pc.equal(teachers, teacher)
            part = queries.filter(mask)
            if teacher is None and self.ensemble is not None:
                out += self._copies(part)
                continue
            sizes = [r.batch_size for r in self.replicas if teacher is None or r.teacher == teacher]
            size = min(sizes) if sizes else 1
            groups = [(None, part)] if not self.by_task else [
                (task, part.filter(pc.equal(part.column("task"), task)))
                for task in sorted(set(part.column("task").to_pylist()))]
            for task, rows in groups:
                out += [_Batch(rows.slice(i, size), teacher, task=task) for i in range(0, rows.num_rows, size)]
        return out

    def _copies(self, queries: pa.Table) -> list[_Batch]:
        """Policy ensemble: the Queries in batches for each asked teacher, cut to that teacher's batch size (the
        hold joins the answers back by query id)."""
        order = {}
        for i, r in enumerate(self.replicas):
            order.setdefault(r.teacher, (getattr(r, "rank", 0), i))
        asked = pick_teachers(sorted(order, key=order.get), {v.teacher for v in self.views if v.alive},
                              self.ensemble.teachers)
        self._hold.expect(queries.column("query_id").to_pylist(), asked)
        out = []
        for teacher in asked:
            size = min([r.batch_size for r in self.replicas if r.teacher == teacher], default=1)
            out += [_Batch(queries.slice(i, size), teacher, copy=True) for i in range(0, queries.num_rows, size)]
        return out

    def _split(self, batch: _Batch) -> list[_Batch]:
        half = batch.table.num_rows // 2
        return [_Batch(part, batch.teacher, attempts=self.max_retries, last_error=batch.last_error, task=batch.task,
                       copy=batch.copy) for part in (batch.table.slice(0, half), batch.table.slice(half))]

    def _fail(self, batch: _Batch, summary: RunSummary) -> None:
        if batch.last_error:
            why = f"no replica could answer after {batch.attempts} attempt(s); last error: {batch.last_error}"
        else:
            why = f"no live replica of teacher {batch.teacher!r}" if batch.teacher else "no live teacher replica"
        self._answered(batch, failed_table(batch.table, batch.teacher or "(none)", why), summary)

    def _answered(self, batch: _Batch, table: pa.Table, summary: RunSummary) -> None:
        """Write a batch's rows; an ensemble copy's go to the hold first, out when their Queries are complete."""
        if batch.copy:
            table = self._hold.add(batch.teacher, table)
        if table is not None:
            self._emit(table, summary)

    def _emit(self, table: pa.Table, summary: RunSummary) -> None:
        ok_mask = pc.equal(table.column("status"), OK)
        ok = int(pc.sum(ok_mask.cast(pa.int64())).as_py() or 0)
        tokens = int(pc.sum(table.column("completion_tokens")).as_py() or 0)
        summary.ok_rows += ok
        summary.failed_rows += table.num_rows - ok
        summary.tokens += tokens
        if not self._buffer:
            self._buffer_since = time.monotonic()
        self._buffer.append(table)
        self._buffered += table.num_rows
        if self._buffered >= self.flush_rows:
            self._flush()
        # progress counts answers; the manifest (updated on each flush) is what counts as stored
        if self.progress:
            self.progress.update(ok, table.num_rows - ok, tokens)

    def _flush(self) -> None:
        if self._buffer:
            table = pa.concat_tables(self._buffer)
            self.sink.append(table)
            self._buffer, self._buffered = [], 0
            if self._source is not None:
                self._source.stored(table)  # only now may the stream forget these prompts


def run_sync(scheduler: Scheduler, queries: pa.Table) -> dict:
    """Run a scheduler to completion from synchronous code (tests, in-process use)."""
    return asyncio.run(scheduler.run(queries))

