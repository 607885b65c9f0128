"""The StudentServer's Prometheus metrics (`GET /metrics`, prometheus_client's text format), in a registry of its
own so that two servers in one process (tests, a notebook) do not share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class ServeMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("backpack_serve_requests", "requests answered, by endpoint and HTTP status",
                                ["endpoint", "code"], registry=r)
        self.queue = Gauge("backpack_serve_queue_depth", "requests waiting or generating", registry=r)
        self.first_token = Histogram("backpack_serve_time_to_first_token_seconds",
                                     "from a request's arrival to its first generated token", buckets=_LATENCY,
                                     registry=r)
        self.latency = Histogram("backpack_serve_request_seconds", "from a request's arrival to its last byte",
                                 buckets=_LATENCY, registry=r)
        self.tokens = Counter("backpack_serve_generated_tokens", "tokens generated", registry=r)
        self.speed = Gauge("backpack_serve_tokens_per_second", "decode speed of the last finished request",
                           registry=r)
        self.version = Gauge("backpack_serve_live_version", "the student version served by default", registry=r)

    def answered(self, endpoint: str, code: int) -> None:
        self.requests.labels(endpoint=endpoint, code=str(code)).inc()

    def generated(self, tokens: int, seconds: float) -> None:
        self.tokens.inc(tokens)
        if seconds > 0 and tokens:
            self.speed.set(tokens / seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
