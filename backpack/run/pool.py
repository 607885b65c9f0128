"""TeacherPool: the teacher replicas of a run as Ray actors, and the handles the scheduler routes to."""

from __future__ import annotations

import time
from typing import Callable, Optional

import pyarrow as pa
import ray

from backpack.config import TeacherConfig
from backpack.core.resources import Demand, Group
from backpack.errors import TeacherDeadError, TeacherError, cause_of
from backpack.run.actors import reserve_replicas, spawn_teacher


class RayReplica:
    """A scheduler `ReplicaHandle` over one teacher actor. Picklable (it travels to the scheduler actor)."""

    def __init__(self, actor, name: str, teacher: str, batch_size: int, max_in_flight: int, tags=(),
                 cost: float = 0.0, rank: int = 0):
        self.actor = actor
        self.name = name
        self.teacher = teacher
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.tags, self.cost, self.rank = tuple(tags), cost, rank  # for the routing policies

    def submit(self, queries: pa.Table):
        return self.actor.generate.remote(queries)  # an ObjectRef, awaitable inside the scheduler's event loop

    def is_fatal(self, error: BaseException) -> bool:
        # the actor died, or its engine did (Ray re-raises a TeacherDeadError from the actor as one)
        return isinstance(error, (ray.exceptions.RayActorError, TeacherDeadError))


def kill_actor(actor) -> None:
    """Kill a Ray actor for good; one already dead is fine."""
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already dead
        pass


class TeacherPool:
    """All replicas of all teachers of a run."""

    def __init__(self, teachers: list[TeacherConfig], ledger=None, ledger_config=None):
        self.configs = teachers
        # the QueryLedger, for the teachers ledger_config (a LedgerConfig) applies to
        self.ledger, self.ledger_config = ledger, ledger_config
        self.replicas: list[RayReplica] = []
        self.infos: list[dict] = []
        # replicas that could not start -> why; the run goes on with the others (TeacherError when none started)
        self.not_started: dict[str, str] = {}
        self.placement_groups: list = []

    def handle(self, t: TeacherConfig, actor, name: str) -> RayReplica:
        """The scheduler's handle of replica `name` of teacher `t` (its routing attributes included)."""
        return RayReplica(actor, name, t.name, t.batch_size, t.max_in_flight, t.tags, t.cost_per_1k_tokens,
                          self.configs.index(t))

    def ledger_for(self, t: TeacherConfig):
        """The ledger teacher `t` asks first, or None."""
        ok = self.ledger is not None and self.ledger_config is not None and self.ledger_config.applies(t.backend)
        return self.ledger if ok else None

    def demands(self) -> list[Demand]:
        """One demand per replica that Ray places on its own (teacher.placement "any")."""
        return [(f"teacher {t.name!r} replica {i}", t.bundle())
                for t in self.configs if t.placement == "any" for i in range(t.replicas)]

    def groups(self) -> list[Group]:
        """The teachers whose replicas are reserved together, by strategy (for the placement check)."""
        return [Group(f"teacher {t.name!r}", (t.bundle(),) * t.replicas, t.placement)
                for t in self.configs if t.placement != "any"]

    def _reserve(self, t: TeacherConfig, timeout: float):
        """A ready placement group for `t`'s replicas. The placement check has already seen that the cluster
        can hold it; this waits for resources other jobs hold, then gives up naming the teacher."""
        pg = reserve_replicas(t)
        self.placement_groups.append(pg)
        ready, _ = ray.wait([pg.ready()], timeout=timeout)
        if not ready:
            self.shutdown()
            raise TeacherError(t.name, f"the cluster did not reserve its {t.replicas} replica(s) "
                                       f"({t.placement}, {t.bundle()} each) within {timeout:.0f} s")
        return pg

    def start(self, timeout: float = 900.0, report: Optional[Callable[[str], None]] = None) -> list[dict]:
        """Spawn every replica and wait until each has loaded its model. A replica that cannot start (a model
        that does not load, an endpoint key that is not set, a vLLM engine that does not fit) is left out and
        recorded in `not_started`: the scheduler routes to the others, so prompts for it are answered elsewhere
        (or failed, naming it, when they asked for that teacher alone). Raises TeacherError naming the first
        replica and its cause when none started. `report` gets a line per replica ready or not started, and one
        every 30 s while replicas wait (for a model load, or for cluster resources other jobs hold)."""
        pending = {}
        for t in self.configs:
            pg = self._reserve(t, timeout) if t.placement != "any" else None
            for i in range(t.replicas):
                name = f"{t.name}/{i}"
                actor = spawn_teacher(t, name, pg, i, self.ledger_for(t))
                self.replicas.append(self.handle(t, actor, name))
                pending[actor.ready.remote()] = name
        total, infos = len(pending), {}
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TeacherError(", ".join(pending.values()), f"did not load within {timeout:.0f} s")
            done, _ = ray.wait(list(pending), num_returns=1, timeout=min(30.0, left))
            if not done:
                if report:
                    free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
                    report(f"still waiting for {len(pending)} replica(s) to load "
                           f"(cluster resources free now: {free})")
                continue
            ref = done[0]
            name = pending.pop(ref)
            try:
                infos[name] = ray.get(ref)
            except ray.exceptions.RayError as e:
                self.not_started[name] = f"could not start: {cause_of(e)}"
                if report:
                    report(f"teacher replica {name} {self.not_started[name]} (the run goes on without it)")
                continue
            if report:
                report(f"teacher replicas ready: {len(infos)}/{total}")
        if not infos:
            first = next(iter(self.not_started))
            self.shutdown()
            raise TeacherError(first, self.not_started[first])
        for r in self.replicas:
            if r.name in self.not_started:
                kill_actor(r.actor)
        self.replicas = [r for r in self.replicas if r.name not in self.not_started]
        self.infos = [infos[r.name] for r in self.replicas]
        return self.infos

    def counters(self, timeout: float = 10.0) -> dict[str, dict]:
        """Each live replica's counters (teachers/accounting.py COUNTERS: retries, rate-limit waits, ledger hits,
        model batches, ...), read from its info; a replica that does not answer in `timeout` is left out."""
        from backpack.teachers.accounting import replica_counters

        refs = {r.name: r.actor.ready.remote() for r in self.replicas}
        infos = {}
        for name, ref in refs.items():
            try:
                infos[name] = ray.get(ref, timeout=timeout)
            except Exception:  # dead or stuck: its incident is recorded elsewhere
                continue
        return replica_counters(infos)

    def shutdown(self) -> None:
        for r in self.replicas:
            kill_actor(r.actor)
        self.replicas = []
        for pg in self.placement_groups:
            try:
                ray.util.remove_placement_group(pg)
            except Exception:  # already removed with its job
                pass
        self.placement_groups = []
