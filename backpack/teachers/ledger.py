"""The query ledger: a teacher's answer to a prompt is paid for once.

In Redis, shared by every run that uses the same server: the answer of teacher T (its model fingerprint) to a
prompt (messages with the recalled context) under decoding parameters D (n and seed included) is stored under
one key. A teacher replica looks its batch up before it generates: answered Queries are answered from the
ledger, at no teacher tokens; a Query another replica is answering right now (a claim with a short lease that
its owner renews while it works) waits for that answer instead of being sent twice; a claim whose owner died
expires within `lease_s` and the Query is taken over. So a second identical run costs nothing, and a run
restarted after a crash resumes at the prompt: what was answered before the crash is not asked again, even
the answers that had not reached a dataset shard yet.

Unseeded sampling (temperature > 0 and no seed) bypasses the ledger: asking again is asking for a new draw.
Failed answers are not stored: a retry asks again.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from dataclasses import asdict
from typing import Callable, Optional

from backpack.core.chat import with_context
from backpack.core.types import Completion, Query
from backpack.teachers.accounting import LEDGER_REPLICA
from backpack.teachers.base import TeacherBase

PREFIX = "backpack:ledger"

# Each compare-and-act in one step (a get-then-act lets a lease expire and change hands in between).
# KEYS[1] the claim; ARGV[1] the owner, ARGV[2] the lease in seconds.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def ledger_key(fingerprint: str, q: Query) -> Optional[str]:
    """The ledger key of Query `q` at the teacher with model `fingerprint`; None when the answer must not be
    reused (unseeded sampling). A score depends on the completion scored, never on sampling: always kept."""
    d = q.decoding
    if not q.scoring and not d.greedy and d.seed is None:
        return None
    parts = [fingerprint, with_context(q.messages, q.context), asdict(d)]
    if q.scoring:
        parts.append(["score", list(q.score_ids)])
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return f"{PREFIX}:{hashlib.sha256(payload.encode('utf-8')).hexdigest()[:32]}"


def run_ledger(cfg, redis_url: str) -> Optional["QueryLedger"]:
    """The ledger of run config `cfg` in the run's Redis, or None when ledger.use is never."""
    lc = cfg.ledger
    if lc.use == "never":
        return None
    return QueryLedger(redis_url, cfg.redis.password_env, lease_s=lc.lease_s,
                       keep_s=lc.keep_days * 86400 if lc.keep_days else None, max_wait_s=lc.max_wait_s)


class QueryLedger:
    """The ledger in the Redis at `redis_url`. Picklable (it connects lazily), so teacher actors carry it."""

    def __init__(self, redis_url: str, password_env: Optional[str] = None, lease_s: float = 60.0,
                 keep_s: Optional[float] = None, max_wait_s: Optional[float] = None):
        self.redis_url, self.password_env = redis_url, password_env
        self.lease_s, self.keep_s = lease_s, keep_s
        # How long a Query waits for another replica's answer before it is answered here too (paying twice
        # beats waiting forever on an owner that renews its lease but never answers)
        self.max_wait_s = max_wait_s if max_wait_s is not None else 5 * lease_s
        self._client = None

    def __getstate__(self):
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            from backpack.runtime.redis_server import connect

            self._client = connect(self.redis_url, self.password_env)
        return self._client

    # ------------------------------------------------------------ answers

    def lookup(self, keys: list[str]) -> list[Optional[list[Completion]]]:
        """The stored Completions per key (None where nothing is stored). A value that does not read as
        Completions (corrupt, or from another version) is a miss: the prompt is answered again and the value
        replaced, rather than failing that prompt in every run that shares the Redis."""
        if not keys:
            return []
        out = []
        for raw in self.client.mget([f"{k}:done" for k in keys]):
            try:
                got = None if raw is None else [Completion(**c) for c in json.loads(raw)]
            except (ValueError, TypeError, AttributeError):
                got = None
            out.append(got or None)
        return out

    def store(self, key: str, completions: list[Completion]) -> None:
        """Record the answer (ok Completions only) and end the claim."""
        value = json.dumps([asdict(c) for c in completions])
        pipe = self.client.pipeline(transaction=True)
        pipe.set(f"{key}:done", value, ex=int(self.keep_s) if self.keep_s else None)
        pipe.delete(f"{key}:claim")
        pipe.execute()

    # ------------------------------------------------------------ claims

    def claim(self, key: str, owner: str) -> bool:
        """Take the right to answer `key` for `lease_s` (renew it while working); False if someone has it. The
        answer may have been stored between a lookup and the claim: look again once it is won."""
        return bool(self.client.set(f"{key}:claim", owner, nx=True, ex=max(1, int(self.lease_s))))

    def renew(self, keys: list[str], owner: str) -> None:
        """Extend the leases of `keys` that `owner` still holds."""
        for k in keys:
            self.client.eval(_RENEW, 1, f"{k}:claim", owner, max(1, int(self.lease_s)))

    def release(self, keys: list[str], owner: str) -> None:
        """Give up claims (the answer failed): the next asker answers."""
        for k in keys:
            self.client.eval(_RELEASE, 1, f"{k}:claim", owner)


class LedgerTeacher(TeacherBase):
    """A teacher that asks the ledger first: answered Queries come from it, claimed ones are waited for, the
    rest are generated (holding claims, renewed in the background) and recorded. Counts what it saved."""

    def __init__(self, teacher, ledger: QueryLedger, wait_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic, max_wait_s: Optional[float] = None):
        self.teacher, self.ledger, self.wait_s, self.clock = teacher, ledger, wait_s, clock
        self.max_wait_s = max_wait_s if max_wait_s is not None else ledger.max_wait_s
        self.name = teacher.name
        self.owner = f"{getattr(teacher, 'replica', teacher.name)}:{uuid.uuid4().hex[:8]}"
        self.stats = {"ledger_hits": 0, "ledger_waits": 0, "tokens_saved": 0}
        self._stats_lock = threading.Lock()  # a threaded actor (dynamic batching) runs several generate calls

    def _count(self, key: str, n: int) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def info(self) -> dict:
        return {**self.teacher.info(), **self.stats}

    def answer(self, qs: list[Query]) -> list[Completion]:
        fingerprint = self.teacher.info()["fingerprint"]
        keys = {q.id: ledger_key(fingerprint, q) for q in qs}
        answers: dict[str, list[Completion]] = {}
        pending = list(qs)
        deadline = self.clock() + self.max_wait_s
        while pending:
            known = [q for q in pending if keys[q.id]]
            for q, found in zip(known, self.ledger.lookup([keys[q.id] for q in known])):
                if found is not None:
                    answers[q.id] = [self._reused(c, q) for c in found]
            pending = [q for q in pending if q.id not in answers]
            late = self.clock() >= deadline  # waited long enough: answer the rest here, claimed or not
            mine = [q for q in pending
                    if late or keys[q.id] is None or self.ledger.claim(keys[q.id], self.owner)]
            # a claim won just after its owner stored the answer and let the claim go: the answer is there
            won = [q for q in mine if keys[q.id]]
            for q, found in zip(won, self.ledger.lookup([keys[q.id] for q in won])):
                if found is not None:
                    answers[q.id] = [self._reused(c, q) for c in found]
                    self.ledger.release([keys[q.id]], self.owner)
            mine = [q for q in mine if q.id not in answers]
            if mine:
                answers.update(self._generate(mine, keys))
            pending = [q for q in pending if q.id not in answers]
            if pending:  # answered elsewhere right now: wait for it rather than pay twice
                self._count("ledger_waits", len(pending))
                time.sleep(self.wait_s)
        return [c for q in qs for c in answers[q.id]]

    def _reused(self, c: Completion, q: Query) -> Completion:
        self._count("ledger_hits", 1)
        self._count("tokens_saved", c.tokens_generated)
        return Completion(**{**asdict(c), "query_id": q.id, "latency_s": 0.0, "replica": LEDGER_REPLICA})

    def _generate(self, mine: list[Query], keys: dict) -> dict[str, list[Completion]]:
        claimed = [keys[q.id] for q in mine if keys[q.id]]
        stop = threading.Event()

        def renew():  # keep the claims alive while a long batch is generated
            while not stop.wait(self.ledger.lease_s / 3):
                try:
                    self.ledger.renew(claimed, self.owner)
                except Exception:  # noqa: BLE001 - a Redis hiccup: the next renewal tries again, well in time
                    continue

        renewer = threading.Thread(target=renew, daemon=True)
        renewer.start()
        try:
            completions = self.teacher.answer(mine)
        except BaseException:
            self.ledger.release(claimed, self.owner)
            raise
        finally:
            stop.set()
        out: dict[str, list[Completion]] = {q.id: [] for q in mine}
        for c in completions:
            out[c.query_id].append(c)
        for q in mine:
            key, got = keys[q.id], out[q.id]
            if key is None:
                continue
            if got and all(c.status == "ok" for c in got):
                self.ledger.store(key, got)
            else:
                self.ledger.release([key], self.owner)
        return out
