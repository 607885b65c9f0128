"""Rate limits and retry delays for remote teachers. Pure: the clock and the randomness are passed in.

A hosted API limits requests per minute and tokens per minute; going over them earns 429s and wasted retries.
`RateLimiter` keeps two token buckets (requests, tokens) that refill continuously and says how long a caller
must wait before its next request. `backoff_s` is the delay before retry number `attempt`: exponential, capped,
with jitter (so many callers that failed together do not retry together), and never shorter than the server's
Retry-After.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Callable, Optional


class _Bucket:
    def __init__(self, per_minute: float, now: float):
        self.rate = per_minute / 60.0          # refill per second
        self.capacity = float(per_minute)      # at most a minute's worth at once
        self.level, self.at = self.capacity, now

    def wait(self, amount: float, now: float) -> float:
        """Seconds until `amount` is available (0 when it is), after refilling to `now`."""
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now
        amount = min(amount, self.capacity)    # one request larger than a minute's budget waits a full bucket
        return max(0.0, (amount - self.level) / self.rate)

    def take(self, amount: float) -> None:
        self.level -= min(amount, self.capacity)


class RateLimiter:
    """Requests-per-minute and tokens-per-minute limits (None: unlimited), safe to share between threads."""

    def __init__(self, requests_per_minute: Optional[float] = None, tokens_per_minute: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        now = clock()
        self._requests = _Bucket(requests_per_minute, now) if requests_per_minute else None
        self._tokens = _Bucket(tokens_per_minute, now) if tokens_per_minute else None
        self.clock, self.sleep = clock, sleep
        self.lock = threading.Lock()
        self.waited_s = 0.0                    # total time callers were held back (reported in the teacher's info)

    def delay(self, tokens: float) -> float:
        """Seconds to wait before a request of `tokens` tokens; 0 means it was admitted (and counted) now."""
        with self.lock:
            now = self.clock()
            wait = max(b.wait(amount, now) for b, amount in ((self._requests, 1.0), (self._tokens, tokens))
                       if b is not None) if (self._requests or self._tokens) else 0.0
            if wait <= 0:
                for b, amount in ((self._requests, 1.0), (self._tokens, tokens)):
                    if b is not None:
                        b.take(amount)
            return wait

    def acquire(self, tokens: float) -> None:
        """Block until a request of `tokens` tokens fits both limits, then count it."""
        while True:
            wait = self.delay(tokens)
            if wait <= 0:
                return
            self.waited_s += wait
            self.sleep(wait)


def backoff_s(attempt: int, base_s: float = 0.5, cap_s: float = 30.0, retry_after_s: Optional[float] = None,
              rng: Optional[random.Random] = None) -> float:
    """Delay before retry `attempt` (0 = the first retry): base * 2**attempt capped at `cap_s`, times a jitter
    factor in [0.5, 1], and at least the server's Retry-After when it sent one."""
    jitter = (rng or random).uniform(0.5, 1.0)
    delay = min(cap_s, base_s * (2 ** attempt)) * jitter
    return max(delay, retry_after_s or 0.0)
