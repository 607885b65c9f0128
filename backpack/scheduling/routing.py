"""Routing policies: which teacher replica gets the next batch. Pure functions, no Ray.

A policy looks at a snapshot of the replicas (`ReplicaView`) and returns the index of the replica to use, or
None when no eligible replica has room. A replica is eligible when it is alive, has fewer batches in flight
than its limit, serves the requested teacher (if the batch names one) and is not excluded (a batch being
retried is not sent back to the replica that just failed it).

    round_robin   the next eligible replica in turn
    least_loaded  the eligible replica with the lowest fill
    by_task       replicas of teachers whose `tags` include the batch's task; when no live teacher is tagged
                  for it, untagged teachers (generalists); never a teacher tagged for other tasks only
    cheapest      the eligible replica whose teacher has the lowest cost per 1k tokens (then least loaded)
    fallback      the teachers in config order as a chain: the first one with a live replica that has not failed
                  the batch gets it (waiting for room there); the next only when every replica before it is
                  dead or has failed the batch
    ensemble      each batch goes to several teachers (scheduler.ensemble): the scheduler pins one copy of it to
                  each asked teacher, and the least-loaded replica of that teacher takes it; the answers are
                  joined and kept by the rules of scheduling/ensemble.py
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence


@dataclass
class ReplicaView:
    name: str            # unique replica name, e.g. "smollm2/0"
    teacher: str         # the teacher config it serves
    in_flight: int = 0   # batches sent and not yet answered
    max_in_flight: int = 2
    alive: bool = True
    served: int = 0      # batches answered so far (tie-breaker for fairness)
    tags: tuple = ()     # tasks or skills the replica's teacher is for (by_task)
    cost: float = 0.0    # its teacher's cost per 1k tokens (cheapest)
    rank: int = 0        # its teacher's position in the config (fallback)


def eligible(r: ReplicaView, teacher: Optional[str], exclude: frozenset[str]) -> bool:
    return (r.alive and r.in_flight < r.max_in_flight and r.name not in exclude
            and (teacher is None or r.teacher == teacher))


def round_robin(replicas: Sequence[ReplicaView], last: int, teacher: Optional[str] = None,
                exclude: frozenset[str] = frozenset(), task: Optional[str] = None) -> Optional[int]:
    """The first eligible replica after index `last`, cycling. Pass the previous choice as `last` (-1 at start)."""
    n = len(replicas)
    for step in range(1, n + 1):
        i = (last + step) % n
        if eligible(replicas[i], teacher, exclude):
            return i
    return None


def _best(replicas: Sequence[ReplicaView], ok: Callable[[ReplicaView], bool], first=lambda r: 0) -> Optional[int]:
    """Among replicas with `ok`, the lowest (first(r), fill, batches served, index)."""
    best, best_key = None, None
    for i, r in enumerate(replicas):
        if not ok(r):
            continue
        key = (first(r), r.in_flight / r.max_in_flight, r.served, i)
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


def least_loaded(replicas: Sequence[ReplicaView], last: int = -1, teacher: Optional[str] = None,
                 exclude: frozenset[str] = frozenset(), task: Optional[str] = None) -> Optional[int]:
    """The eligible replica with the lowest fill (in_flight / max_in_flight); ties go to fewer batches served,
    then to the lower index. `last` is accepted for a uniform signature and ignored."""
    return _best(replicas, lambda r: eligible(r, teacher, exclude))


def by_task(replicas: Sequence[ReplicaView], last: int = -1, teacher: Optional[str] = None,
            exclude: frozenset[str] = frozenset(), task: Optional[str] = None) -> Optional[int]:
    """The least-loaded replica of a teacher tagged for `task`; generalists (no tags) when no live teacher is."""
    live = [r for r in replicas if r.alive and r.name not in exclude and (teacher is None or r.teacher == teacher)]
    tagged = any(task in r.tags for r in live)
    return _best(replicas, lambda r: eligible(r, teacher, exclude) and (task in r.tags if tagged else not r.tags))


def cheapest(replicas: Sequence[ReplicaView], last: int = -1, teacher: Optional[str] = None,
             exclude: frozenset[str] = frozenset(), task: Optional[str] = None) -> Optional[int]:
    """The eligible replica of the cheapest teacher (cost per 1k tokens), then the least loaded."""
    return _best(replicas, lambda r: eligible(r, teacher, exclude), first=lambda r: r.cost)


def fallback(replicas: Sequence[ReplicaView], last: int = -1, teacher: Optional[str] = None,
             exclude: frozenset[str] = frozenset(), task: Optional[str] = None) -> Optional[int]:
    """The teachers in config order as a chain: the first rank with a live replica that has not failed the
    batch; the least loaded of its replicas with room (None, so the batch waits, when they are all busy)."""
    ranks = [r.rank for r in replicas
             if r.alive and r.name not in exclude and (teacher is None or r.teacher == teacher)]
    if not ranks:
        return None
    head = min(ranks)
    return _best(replicas, lambda r: r.rank == head and eligible(r, teacher, exclude))


Policy = Callable[..., Optional[int]]
POLICIES: dict[str, Policy] = {"round_robin": round_robin, "least_loaded": least_loaded, "by_task": by_task,
                               "cheapest": cheapest, "fallback": fallback,
                               # the copies are pinned to their teachers: only the replica is chosen here
                               "ensemble": least_loaded}


def can_ever_serve(replicas: Sequence[ReplicaView], teacher: Optional[str], exclude: frozenset[str]) -> bool:
    """True if some live replica could take the batch once it has room (so waiting is worthwhile)."""
    return any(r.alive and r.name not in exclude and (teacher is None or r.teacher == teacher) for r in replicas)
