"""Run progress kept in Redis, so any process (the CLI's progress bar, `backpack status`) can read it."""

from __future__ import annotations

import time
from typing import Optional

from backpack.runtime.redis_server import RunRedis


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
