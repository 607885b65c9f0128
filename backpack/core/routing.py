"""Routing policies: which teacher replica gets the next batch. Pure functions, no Ray.

A policy looks at a snapshot of the replicas (`ReplicaView`) and returns the index of the replica to use, or
None when no eligible replica has room. A replica is eligible when it is alive, has fewer batches in flight
than its limit, serves the requested teacher (if the batch names one) and is not excluded (a batch being
retried is not sent back to the replica that just failed it).
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


def eligible(r: ReplicaView, teacher: Optional[str], exclude: frozenset[str]) -> bool:
    return (r.alive and r.in_flight < r.max_in_flight and r.name not in exclude
            and (teacher is None or r.teacher == teacher))


def round_robin(replicas: Sequence[ReplicaView], last: int, teacher: Optional[str] = None,
                exclude: frozenset[str] = frozenset()) -> Optional[int]:
    """The first eligible replica after index `last`, cycling. Pass the previous choice as `last` (-1 at start)."""
    n = len(replicas)
    for step in range(1, n + 1):
        i = (last + step) % n
        if eligible(replicas[i], teacher, exclude):
            return i
    return None


def least_loaded(replicas: Sequence[ReplicaView], last: int = -1, teacher: Optional[str] = None,
                 exclude: frozenset[str] = frozenset()) -> Optional[int]:
    """The eligible replica with the lowest fill (in_flight / max_in_flight); ties go to fewer batches served,
    then to the lower index. `last` is accepted for a uniform signature and ignored."""
    best, best_key = None, None
    for i, r in enumerate(replicas):
        if not eligible(r, teacher, exclude):
            continue
        key = (r.in_flight / r.max_in_flight, r.served, i)
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


Policy = Callable[..., Optional[int]]
POLICIES: dict[str, Policy] = {"round_robin": round_robin, "least_loaded": least_loaded}


def can_ever_serve(replicas: Sequence[ReplicaView], teacher: Optional[str], exclude: frozenset[str]) -> bool:
    """True if some live replica could take the batch once it has room (so waiting is worthwhile)."""
    return any(r.alive and r.name not in exclude and (teacher is None or r.teacher == teacher) for r in replicas)
