"""Continuous batching for the StudentServer: requests that arrive while others generate join the running batch
at the next step and leave it the step they finish, so concurrent clients share each forward pass instead of
queueing behind one another.

One engine per loaded model runs a worker thread. A step feeds every running row its last token (one forward
over the batch's KV cache); new rows are prefilled together (left-padded) and their cache joined to the batch's,
both padded on the left to the same length, with the attention mask and per-row positions saying which columns
are real. Each row keeps its own decoding: greedy, or temperature and top-p with its own seeded generator, so a
request's answer does not depend on what it was batched with (up to float rounding). Finished, cancelled or
failed rows leave at once. The model families whose forward takes per-row positions and a DynamicCache
(`backpack.teachers.decode.supports`) are batched; others fall back to one request at a time.

With adapters of one shared base (serve.merge false) a batch holds one adapter's rows: the engine takes the
oldest waiting request's adapter, and rows of other adapters wait until the batch has drained.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from backpack.core.types import LENGTH, STOP, DecodingParams
from backpack.teachers.decode import supports

IDLE_S = 10.0  # seconds an engine's thread waits for work before it ends


@dataclass
class Job:
    """One request's generation. `on_token(token_id)` runs in the engine's thread for each new token;
    `done` is set when the job has finished (tokens, finish reason) or failed (error)."""
    ids: list[int]
    decoding: DecodingParams
    on_token: Optional[Callable[[int], None]] = None
    on_done: Optional[Callable[[], None]] = None   # runs in the engine's thread once `done` is set
    adapter: Optional[str] = None
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    finish: str = LENGTH
    error: Optional[BaseException] = None


def engine_for(gen, max_batch: int) -> Optional["BatchEngine"]:
    """The engine of a loaded model (made on first use, kept on the model's HFTeacher), or None where requests
    run one at a time: serve.max_batch 1, or a model family the batch loop does not cover."""
    if max_batch <= 1 or not supports(gen.model):
        return None
    engine = getattr(gen, "batch_engine", None)
    if engine is None:
        engine = gen.batch_engine = BatchEngine(gen, max_batch)
    return engine


class BatchEngine:
    def __init__(self, gen, max_batch: int):
        self.gen, self.max_batch = gen, max_batch
        self._waiting: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self.steps = 0            # forward passes run (for tests and metrics)
        self.widest = 0           # the most rows a step ran

    def submit(self, job: Job) -> None:
        with self._lock:
            self._waiting.append(job)
            if self._thread is None:  # one worker while there is work
                self._thread = threading.Thread(target=self._run, name="backpack-batch", daemon=True)
                self._thread.start()
            self._lock.notify()

    # ------------------------------------------------------------------ the worker thread

    def _take(self, adapter: Optional[str], any_adapter: bool, room: int, block: bool) -> Optional[list[Job]]:
        """Waiting jobs that join now: at most `room`, all of one adapter (`adapter`, or the oldest job's when
        `any_adapter`); with `block`, wait for one (None: none came for IDLE_S, the thread ends)."""
        with self._lock:
            if block and not self._waiting:
                self._lock.wait(timeout=IDLE_S)
                if not self._waiting:  # idle: the thread ends (and lets go of the model); submit starts another
                    self._thread = None
                    return None
            out, keep = [], collections.deque()
            for job in self._waiting:
                if job.cancel.is_set():  # its client left while it waited
                    _finish(job, STOP)
                elif len(out) < room and (any_adapter or job.adapter == adapter):
                    adapter, any_adapter = job.adapter, False
                    out.append(job)
                else:
                    keep.append(job)
            self._waiting = keep
            return out

    def _run(self) -> None:
        batch: Optional[_Batch] = None
        while True:
            joining = self._take(batch.adapter if batch else None, batch is None,
                                 self.max_batch - (batch.size if batch else 0), block=batch is None)
            if joining is None:
                return
            try:
                with torch.inference_mode():
                    if joining:
                        if joining[0].adapter is not None and batch is None:
                            self.gen.model.set_adapter(joining[0].adapter)
                        new = _Batch.prefill(self.gen, joining)
                        batch = new if batch is None else batch.join(new)
                    elif batch is not None:
                        batch.step()
                    else:
                        continue
                    self.steps += 1
                    self.widest = max(self.widest, batch.size)
                    batch = batch.drop_finished()
            except BaseException as e:  # a failed forward fails the rows it ran, never the server
                for job in (batch.jobs if batch else []) + joining:
                    if not job.done.is_set():
                        _finish(job, STOP, e)
                batch = None


def _finish(job: Job, finish: str, error: Optional[BaseException] = None) -> None:
    job.finish, job.error = finish, error
    job.done.set()
    if job.on_done is not None:
        job.on_done()


class _Batch:
    """The running rows: their jobs, KV cache [rows, heads, columns, dim] per layer, attention mask [rows,
    columns], next positions and last tokens."""

    def __init__(self, gen, jobs, cache, mask, positions, last, logits):
        self.gen, self.jobs, self.cache, self.mask, self.positions, self.last = gen, jobs, cache, mask, positions, last
        self.adapter = jobs[0].adapter if jobs else None
        self.generators = [_generator(j.decoding) for j in jobs]
        self._emit(logits)

    @property
    def size(self) -> int:
        return len(self.jobs)

    @classmethod
    def prefill(cls, gen, jobs: list[Job]) -> "_Batch":
        width = max(len(j.ids) for j in jobs)
        pad = gen.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(j.ids)) + j.ids for j in jobs])
        mask = torch.tensor([[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in jobs])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache()
        out = gen.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=True)
        return cls(gen, jobs, out.past_key_values, mask, mask.sum(-1), None, out.logits[:, -1].float())

    def _emit(self, logits: torch.Tensor) -> None:
        """Pick each row's next token from its logits [rows, vocab] and hand it to its job."""
        picked = []
        for row, (job, g) in enumerate(zip(self.jobs, self.generators)):
            token = _pick(logits[row], job.decoding, g)
            picked.append(token)
            if token in self.gen.stop_ids:
                _finish(job, STOP)
                continue
            job.tokens.append(token)
            if job.on_token is not None:
                try:
                    job.on_token(token)
                except Exception:  # its reader is gone (a closed loop, say): that row stops, not the batch
                    job.cancel.set()
            if len(job.tokens) >= job.decoding.max_new_tokens:
                _finish(job, LENGTH)
        self.last = torch.tensor(picked)[:, None]

    def step(self) -> None:
        self.mask = torch.cat([self.mask, torch.ones(self.size, 1, dtype=self.mask.dtype)], dim=1)
        out = self.gen.model(input_ids=self.last, attention_mask=self.mask, position_ids=self.positions[:, None],
                             past_key_values=self.cache, use_cache=True)
        self.cache, self.positions = out.past_key_values, self.positions + 1
        self._emit(out.logits[:, -1].float())

    def drop_finished(self) -> Optional["_Batch"]:
        keep = [i for i, j in enumerate(self.jobs) if not j.done.is_set() and not j.cancel.is_set()]
        for j in self.jobs:
            if j.cancel.is_set() and not j.done.is_set():
                _finish(j, STOP)
        if not keep:
            return None
        if len(keep) < self.size:
            index = torch.tensor(keep)
            self.cache = _rebuild(self.cache, lambda t: t.index_select(0, index))
            self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
            self.jobs = [self.jobs[i] for i in keep]
            self.generators = [self.generators[i] for i in keep]
        return self

    def join(self, other: "_Batch") -> "_Batch":
        """`other`'s rows added to this batch: both caches padded on the left to the same number of columns."""
        a, b = self.mask.shape[1], other.mask.shape[1]
        width = max(a, b)
        left = lambda t, n: torch.nn.functional.pad(t, (0, 0, n, 0)) if n else t  # noqa: E731  (dim 2 of [B,H,L,D])
        mine = [(left(k, width - a), left(v, width - a)) for k, v in _tensors(self.cache)]
        theirs = [(left(k, width - b), left(v, width - b)) for k, v in _tensors(other.cache)]
        from transformers import DynamicCache

        self.cache = DynamicCache([(torch.cat([k1, k2]), torch.cat([v1, v2])) for (k1, v1), (k2, v2) in
                                   zip(mine, theirs)])
        pad = lambda m, n: torch.nn.functional.pad(m, (n, 0)) if n else m  # noqa: E731
        self.mask = torch.cat([pad(self.mask, width - a), pad(other.mask, width - b)])
        self.positions = torch.cat([self.positions, other.positions])
        self.last = torch.cat([self.last, other.last])
        self.jobs += other.jobs
        self.generators += other.generators
        return self


def _tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _rebuild(cache, fn):
    from transformers import DynamicCache

    return DynamicCache([(fn(k), fn(v)) for k, v in _tensors(cache)])


def _generator(p: DecodingParams) -> Optional[torch.Generator]:
    if p.greedy:
        return None
    g = torch.Generator()
    if p.seed is not None:
        g.manual_seed(p.seed)
    else:
        g.seed()
    return g


def _pick(logits: torch.Tensor, p: DecodingParams, g: Optional[torch.Generator]) -> int:
    """One row's next token: greedy, or temperature then top-p then a draw from its own generator."""
    if p.greedy:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_p < 1.0:
        ordered, order = logits.sort(descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs > p.top_p
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, ordered.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=g))
