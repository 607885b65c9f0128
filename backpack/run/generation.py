"""The generation half of a run, batch or continual: teacher replicas (asking the query ledger first), recall
from the Mental Process, and the scheduler actor that routes prompts to the teachers and stores their answers.

Both drivers go through `Generation` in the same order: plan it (the pool and recall: a bad knowledge pack
fails here, before Ray is touched), check the cluster can place it (with whatever else the run spawns), start
the teachers, then spawn schedulers. What it spawned is killed when the run's session ends.
"""

from __future__ import annotations

import json
import time
from typing import Iterable, Optional

from backpack.config import RunConfig
from backpack.core.resources import Demand, Group
from backpack.data.storage import run_files
from backpack.mental.setup import prepare_recall
from backpack.run.actors import spawn_scheduler
from backpack.run.pool import TeacherPool, kill_actor
from backpack.runtime import ray_runtime
from backpack.runtime.progress import RedisProgress, Reporter
from backpack.runtime.session import RunSession
from backpack.scheduling.scheduler import settings
from backpack.teachers.accounting import INCIDENTS, REPLICAS, incident_lines
from backpack.teachers.ledger import run_ledger


def prepare_models(cfg: RunConfig) -> None:
    """On a local cluster, resolve (and for GGUF, convert once) each teacher's model in this process, so a
    missing or broken model is one clear error before any actor starts, and replicas all load the cache."""
    from backpack.teachers.loader import resolve_model

    for t in cfg.teachers:
        if t.backend == "hf":
            resolve_model(t.model)


class Generation:
    """The teachers, recall and schedulers of one run (see the module docstring)."""

    def __init__(self, session: RunSession, prompt_tasks: Optional[Iterable[str]] = None):
        """Plan the run's generation: its teacher pool and its recall. `prompt_tasks`, the tasks of a batch run's
        prompts, lets recall refuse a run in which no prompt's task has knowledge (a mistyped name)."""
        cfg, self.session, self.rep = session.cfg, session, session.rep
        self.cfg, self.files = cfg, run_files(cfg)
        self.pool = TeacherPool(cfg.teachers, run_ledger(cfg, session.redis_url), cfg.ledger)
        self.recaller = prepare_recall(cfg, session.redis_url, prompt_tasks, self.rep.stage)
        self.schedulers: list = []
        session.on_exit(self.shutdown)

    @classmethod
    def started(cls, session: RunSession, prompt_tasks: Optional[Iterable[str]] = None) -> "Generation":
        """The run's generation with Ray joined, placement checked and the teachers started."""
        gen = cls(session, prompt_tasks)
        session.connect_ray()
        gen.check_placement()
        gen.start_teachers()
        return gen

    def placement(self) -> tuple[list[Demand], list[Group]]:
        """What the teacher replicas need of the cluster: actors Ray places alone, and groups reserved together."""
        return self.pool.demands(), self.pool.groups()

    def check_placement(self, demands: Iterable[Demand] = (), groups: Iterable[Group] = ()) -> None:
        """ResourceError, before anything is spawned, unless the cluster can place the teachers with `demands`
        and `groups` (what else the run spawns)."""
        own_demands, own_groups = self.placement()
        ray_runtime.check_placement(own_demands + list(demands), own_groups + list(groups))

    def start_teachers(self) -> None:
        """Load every teacher replica (models prepared here first on a local cluster). A replica that cannot start
        is recorded as an incident and the run goes on with the others (TeacherError when none started)."""
        if ray_runtime.is_local(self.cfg.ray):
            self.rep.stage("preparing teacher models (a GGUF is converted once, then cached)")
            prepare_models(self.cfg)
        self.rep.stage(f"loading {sum(t.replicas for t in self.cfg.teachers)} teacher replica(s)")
        self.pool.start(report=self.rep.stage)
        self.record_incidents(self.pool.not_started, {})

    def spawn_scheduler(self, store, progress):
        """A scheduler actor over the live replicas, writing to `store`, recalling for each batch."""
        scheduler = spawn_scheduler(self.pool.replicas, store, progress, recall=self.recaller,
                                    **settings(self.cfg.scheduler))
        self.schedulers.append(scheduler)
        return scheduler

    def record_incidents(self, not_started: dict[str, str], died: dict[str, str]) -> None:
        """Replicas that could not start or died, for `backpack status` and the report."""
        if not_started or died:
            self.files.append_text(INCIDENTS, incident_lines(not_started, died, time.time()))

    def record_counters(self) -> None:
        """Each replica's retries, rate-limit waits, ledger hits: for `backpack status` and the report."""
        self.files.write_text(REPLICAS, json.dumps(self.pool.counters()))

    def shutdown(self) -> None:
        """Kill every scheduler and replica this generation spawned (on a shared cluster nothing of a run may
        outlive it)."""
        for scheduler in self.schedulers:
            kill_actor(scheduler)
        self.schedulers = []
        self.pool.shutdown()


def wait_with_progress(ref, progress: RedisProgress, rep: Reporter) -> dict:
    """The result of a scheduler's `run` call, showing its progress (answers, failures, tokens) meanwhile."""
    import ray

    start = time.perf_counter()
    while True:
        done, _ = ray.wait([ref], timeout=0.5)
        p = progress.read()
        rep.progress(int(p.get("done", 0)), int(p.get("failed", 0)), int(p.get("total", 0)),
                     int(p.get("tokens", 0)), time.perf_counter() - start)
        if done:
            return ray.get(ref)
