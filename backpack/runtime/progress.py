"""Progress of long work: the reporters a driver tells its stages and generation progress to (silent for
library users, lines and a bar for the CLI), and the run's counters kept in Redis, so any process (the CLI's
progress bar, `backpack status`) can read them."""

from __future__ import annotations

import sys
import time
from typing import Optional

from backpack.runtime.redis_server import RunRedis


class Reporter:
    """Progress callbacks of a driver; the base class says nothing (a library user's default)."""

    def stage(self, text: str) -> None: ...

    def progress(self, done: int, failed: int, total: int, tokens: int, seconds: float) -> None: ...


class TerminalReporter(Reporter):
    """Stages and generation progress (prompts done / failed, tokens/s) on stderr: a tqdm bar on a terminal;
    elsewhere (a Ray Job's log, a file, CI) a plain line every LOG_EVERY seconds and at the end, as a bar's
    redraws would pile up there as one endless line."""

    LOG_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal

    def __init__(self, quiet: bool = False, stream=None, clock=time.monotonic):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.clock = clock
        self.bar = None
        self._logged: Optional[float] = None  # when the last plain line was written

    def stage(self, text: str) -> None:
        if not self.quiet:
            print(f"[backpack] {text}", file=self.stream, flush=True)

    def progress(self, done: int, failed: int, total: int, tokens: int, seconds: float) -> None:
        if self.quiet or not total:
            return
        rate = tokens / seconds if seconds else 0.0
        if not self.stream.isatty():
            now, finished = self.clock(), done + failed >= total
            if not finished and self._logged is not None and now - self._logged < self.LOG_EVERY:
                return
            self._logged = now
            print(f"[backpack] answered {done + failed}/{total} ({failed} failed), {rate:.1f} tok/s",
                  file=self.stream, flush=True)
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="answer", dynamic_ncols=True, file=self.stream)
        self.bar.n = done + failed
        self.bar.set_postfix(failed=failed, tok_s=f"{rate:.1f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RedisProgress(RunRedis):
    """Counters for one run in a Redis hash. Picklable: it connects lazily in whichever process uses it."""

    def start(self, total: int) -> None:
        self.client.delete(self.keys.progress, self.keys.replicas)
        self.client.hset(self.keys.progress, mapping={"total": total, "done": 0, "failed": 0, "tokens": 0,
                                                      "started_at": time.time(), "state": "running"})

    def update(self, ok: int, failed: int, tokens: int) -> None:
        pipe = self.client.pipeline()
        pipe.hincrby(self.keys.progress, "done", ok)
        pipe.hincrby(self.keys.progress, "failed", failed)
        pipe.hincrby(self.keys.progress, "tokens", tokens)
        pipe.execute()

    def replica_state(self, replica: str, state: str) -> None:
        self.client.hset(self.keys.replicas, replica, state)

    def finish(self, state: str = "finished") -> None:
        self.client.hset(self.keys.progress, mapping={"state": state, "finished_at": time.time()})

    def read(self) -> dict:
        raw = self.client.hgetall(self.keys.progress)
        out: dict[str, Optional[float | str]] = {}
        for k, v in raw.items():
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
        return out
