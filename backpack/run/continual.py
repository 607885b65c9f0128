"""The continual loop: `backpack run CONFIG --continual`.

One driver (this process) starts and watches four kinds of parts, each of which keeps its state where a crash
cannot lose it:

    intake stream (Redis) ─► scheduler actor ─► teacher actors ─► DatasetStore shards (by size or by age)
                                                                     │
                     continual trainer (Ray Train, a Ray task) ◄─────┘ ─► registry versions (Redis + files)
                                                                                 │
                     promotion gate (a thread here) ◄── published versions ──────┘ ─► `promoted` events
                                                                                 │
                     StudentServer actor (HTTP) ◄── swaps to each promoted version ◄┘

What is done about a part that ends or dies is decided by `backpack.run.supervisor` (states and decisions,
tested without Ray); this module looks at the parts and applies the decisions:

- a prompt leaves the stream only once its answer is stored (see `backpack.scheduling.intake`), so when the
  scheduler actor dies it is started again and reads what it had not stored; a dead teacher replica is
  respawned and handed to the scheduler, whose batches wait for it;
- the trainer checkpoints and publishes every K steps or T seconds; when it fails past training.max_failures
  it is started again from its last checkpoint;
- the server is started again when it dies, on the live version;
- stop: Ctrl-C (or SIGTERM, or the stop flag `backpack:<run>:control:stop` set by anyone) sets the stop flag;
  the scheduler stores what teachers are answering and leaves unsent prompts in the stream, the trainer writes
  its last checkpoint, then everything started here is stopped. Running the same command again resumes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from backpack.config import RunConfig
from backpack.data.storage import run_files
from backpack.data.store import DatasetStore
from backpack.errors import BackpackError, InputError, cause_of
from backpack.run.generation import Generation
from backpack.run.pool import kill_actor
from backpack.run.supervisor import (Ended, Fail, Observation, RespawnTeacher, RestartScheduler, RestartServer,
                                     RestartTrainer, RunState, ServedVersion, Stop, Supervisor)
from backpack.runtime.progress import Reporter
from backpack.runtime.redis_server import RunKeys, connect, with_retries
from backpack.runtime.session import RunSession
from backpack.scheduling.intake import Intake, IntakeSource, answered_prompts
from backpack.student.checkpoints import checkpoint_states, latest_checkpoint

WATCH_S = 1.0              # how often the driver looks at its parts
RESPAWN_TIMEOUT_S = 300.0  # a respawned teacher replica that is not ready by then is given up and tried again
TRAINER_STOP_S = 600.0     # at most this long for the trainer to write its last checkpoint after the stop flag
TRAINER_EXIT_S = 90.0      # and, once that checkpoint is written, this long for Ray Train to end the run


@dataclass
class ContinualResult:
    """What a continual run did before it was stopped."""
    answered: int = 0
    failed: int = 0
    step: int = 0
    versions: list = field(default_factory=list)   # versions published by this run
    live: Optional[int] = None
    server_url: Optional[str] = None
    restarts: dict = field(default_factory=dict)   # part -> times it was started again
    seconds: float = 0.0


def _check(cfg: RunConfig) -> None:
    """Config checks a continual run needs beyond those of the config itself."""
    cfg.require("student", "training")
    tc = cfg.training
    if tc.kd_weight > 0 and cfg.decoding.logprobs < tc.top_k:
        raise InputError(f"training.kd_weight={tc.kd_weight} uses the teachers' top-{tc.top_k} logprobs, but "
                         f"decoding.logprobs={cfg.decoding.logprobs}: raise decoding.logprobs or lower "
                         "training.top_k (or set training.kd_weight: 0)")


def _ended(ref, value: Callable = lambda x: x) -> Optional[Ended]:
    """How the Ray task or actor call `ref` ended, or None while it runs."""
    import ray

    done, _ = ray.wait([ref], timeout=0)
    if not done:
        return None
    try:
        return Ended(True, value(ray.get(ref)))
    except ray.exceptions.RayError as e:
        return Ended(False, error=cause_of(e))


class ContinualRun:
    """The driver of one continual run (see the module docstring). `run()` blocks until stopped."""

    def __init__(self, cfg: RunConfig, reporter: Optional[Reporter] = None,
                 on_ready: Optional[Callable[[dict], None]] = None):
        _check(cfg)
        self.cfg, self.rep, self.on_ready = cfg, reporter or Reporter(), on_ready
        self.files, self.keys = run_files(cfg), RunKeys(cfg.name)
        self.supervisor = Supervisor()
        self.result = ContinualResult(restarts=self.supervisor.restarts)
        self.gen: Optional[Generation] = None
        self.scheduler = self.trainer = self.server = self.gate = None
        self.scorers: list = []  # the schedulers of on-policy training (training.objective on_policy or mixed)
        self._stop = threading.Event()

    @property
    def pool(self):
        """The run's teacher replicas (None before they are planned)."""
        return self.gen.pool if self.gen is not None else None

    def stop(self) -> None:
        """Stop the run from another thread (as Ctrl-C does)."""
        self._stop.set()

    # ------------------------------------------------------------------ the whole run

    def run(self) -> ContinualResult:
        t0 = time.perf_counter()
        with RunSession(self.cfg, self.rep) as session:
            self.session, self.url = session, session.redis_url
            self.redis = connect(self.url)
            self.redis.delete(self.keys.stop)  # a new run: the last one's stop is done
            try:
                session.connect_ray()
                self._start()
                self.supervisor.running()
                self._watch()
            except KeyboardInterrupt:
                self.rep.stage("stopping (Ctrl-C): storing the answers teachers are working on, writing the last "
                               "checkpoint")
            finally:
                self.supervisor.stopping()
        self.result.seconds = time.perf_counter() - t0
        return self.result

    def _start(self) -> None:
        import ray

        from backpack.eval.gate import GateWatcher
        from backpack.student.preflight import student_checks
        from backpack.student.registry import Registry

        cfg = self.cfg
        # prompts arrive later through the intake, so their tasks are not checked against the knowledge here
        self.gen = Generation(self.session)
        self.session.on_exit(self._shutdown)  # runs before the generation's actors are killed
        server = cfg.serve.bundle()
        self.gen.check_placement([("student server", server)] if server else [], [cfg.training.workers_group()])
        self.tc, self.same_tokenizer, _ = student_checks(cfg, self.rep)
        self.store = DatasetStore(str(cfg.dataset_dir))
        self.registry = Registry(self.url, cfg.name, self.files)
        self.known_versions = {m["version"] for m in self.registry.versions()}
        # prompts answered before (a batch generate of this run): pushing one again is a duplicate, pushing
        # another prompt under one of their ids is refused at the push
        answered = self._answered_prompts()
        Intake(self.url, cfg.name).claim_answered(answered)
        self._seed_prompts()
        self._start_server()  # first: a port already in use is a clear error before anything slow starts
        self.gen.start_teachers()
        self._start_scheduler(answered)
        resume = latest_checkpoint(self.files)
        self._start_trainer(resume[0] if resume else None)
        self.rep.stage("training continually" + (f" from step {resume[1]}" if resume else ""))
        self.gate = GateWatcher(cfg, self.registry, self.store, self.rep.stage, WATCH_S)
        self.gate.start()
        ready = {"redis_url": self.url, "server_url": self.server_url, "run": cfg.name,
                 "ray_address": ray.get_runtime_context().gcs_address}
        self.rep.stage(f"serving the student at {self.server_url}/v1/chat/completions; push prompts with "
                       f"`backpack ingest CONFIG FILE|-`; Ctrl-C stops")
        if self.on_ready:
            self.on_ready(ready)

    def _answered_prompts(self) -> dict[str, str]:
        from backpack.core.schema import QUERY_FIELDS

        return answered_prompts(self.store.read(columns=[f.name for f in QUERY_FIELDS] + ["status"]))

    def _seed_prompts(self) -> None:
        """The config's prompt collection, if any, is pushed to the intake first (once: duplicates are skipped,
        so a restart pushes nothing new)."""
        from backpack.data.prompts import read_prompts
        from backpack.run.synthesize import prompt_file

        p = self.cfg.prompts
        if not p or not p.path:
            return
        queries, rejected = read_prompts(prompt_file(self.cfg), self.cfg.decoding.params(), p.default_task, p.limit,
                                         p.max_chars, p.override_caps(self.cfg.decoding))
        accepted, duplicates = Intake(self.url, self.cfg.name).push_many(queries)
        self.rep.stage(f"prompts from {p.path}: {accepted} pushed to the intake, {duplicates} already pushed"
                       + (f", {len(rejected)} rejected (bad records)" if rejected else ""))

    # ------------------------------------------------------------------ the parts

    def _start_scheduler(self, answered: Optional[dict[str, str]] = None) -> None:
        """`answered`: the dataset's answered prompts when just read (a restart reads them again)."""
        from backpack.runtime.progress import RedisProgress

        status = self.store.query_status()
        answered = answered if answered is not None else self._answered_prompts()
        self.scheduler = self.gen.spawn_scheduler(self.store, RedisProgress(self.url, self.cfg.name))
        # The same consumer name after a restart: the new scheduler first reads what the dead one had not stored.
        source = IntakeSource(self.url, self.cfg.name, answered, stored_ids=set(status))
        self.scheduler_ref = self.scheduler.run_stream.remote(source, self.cfg.continual.poll_seconds)

    def _start_trainer(self, resume_from: Optional[str]) -> None:
        from backpack.run.actors import spawn_continual_trainer

        cfg = self.cfg
        self.trainer = spawn_continual_trainer(
            str(cfg.dataset_dir), cfg.student, self.tc, cfg.continual, self.files.sub("train"), cfg.name,
            redis_url=self.url, run=cfg.name, heldout_fraction=cfg.eval.heldout_fraction,
            resume_from=resume_from, metrics_file=self.files.uri("train/metrics.jsonl"),
            same_tokenizer=self.same_tokenizer, registry=self.registry, grounded_only=cfg.grounded_only,
            on_policy=self._start_scorers())

    def _start_scorers(self) -> Optional[dict]:
        """With training.objective on_policy or mixed: fresh schedulers (one per training worker) over the live
        teachers, scoring the student's samples into the run's on-policy dataset; None otherwise."""
        from backpack.student.on_policy import ON_POLICY_DATASET

        for scorer in self.scorers:
            kill_actor(scorer)
        self.scorers = []
        if self.tc.objective == "off_policy":
            return None
        store = DatasetStore(self.files.uri(ON_POLICY_DATASET))
        self.scorers = [self.gen.spawn_scheduler(store, None) for _ in range(self.tc.num_workers)]
        return {"schedulers": self.scorers, "store": self.files.uri(ON_POLICY_DATASET)}

    def _start_server(self) -> None:
        import ray

        from backpack.run.actors import spawn_server

        student_recall = self.cfg.mental is not None and self.cfg.mental.student_recall
        self.server = spawn_server(self.cfg.student, self.cfg.serve, self.registry, model_name=self.cfg.name,
                                   recall=self.gen.recaller if student_recall else None,
                                   default_task=self.cfg.prompts.default_task)
        try:
            self.server_url = ray.get(self.server.start.remote())
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, BackpackError):  # e.g. serve.port already in use: its own clear message
                raise e.cause from None
            raise BackpackError(f"the student server did not start: {cause_of(e)}") from None
        self.result.server_url = self.server_url
        self.redis.hset(self.keys.server, mapping={"url": self.server_url, "version": self.registry.live() or 0})

    # ------------------------------------------------------------------ watching: look, decide, apply

    def _watch(self) -> None:
        while not self._stop.is_set():
            for decision in self.supervisor.decide(self._observe()):
                self._apply(decision)
            if self.supervisor.state is not RunState.RUNNING:
                return
            self._stop.wait(WATCH_S)

    def _observe(self) -> Observation:
        """One look at every part. The stop flag is read last: a part that ended because of it is seen
        together with it, and so is not restarted."""
        import ray

        try:
            dead = tuple(ray.get(self.scheduler.dead_replicas.remote(), timeout=10))
        except ray.exceptions.RayError:
            dead = ()  # the scheduler itself is gone or busy: seen to below
        scheduler = _ended(self.scheduler_ref)
        trainer = _ended(self.trainer, lambda res: res.step)
        try:
            server, version = "alive", ray.get(self.server.info.remote(), timeout=30)["version"]
        except ray.exceptions.GetTimeoutError:
            server, version = "busy", None  # loading a version: alive
        except ray.exceptions.RayError:
            server, version = "dead", None
        stop = self._stop.is_set() or with_retries(lambda: self.redis.get(self.keys.stop), "reading the stop flag",
                                                   self.url) == "1"
        return Observation(stop, dead, scheduler, trainer, server, version)

    def _apply(self, decision) -> None:
        match decision:
            case Stop():
                self.rep.stage("stop requested: stopping")
            case RespawnTeacher(replica):
                self._respawn(replica)
            case RestartScheduler(ended):
                if ended.ok:  # it returns only when asked to stop
                    self._count(ended.value)
                else:
                    self.rep.stage(f"the scheduler died ({ended.error[:200]}): starting it again; prompts it had "
                                   "not stored are delivered again")
                kill_actor(self.scheduler)  # a scheduler whose method raised is still alive: no leak
                self._start_scheduler()
            case RestartTrainer(why, step):
                if step is not None:
                    self.result.step = step
                resume = latest_checkpoint(self.files)
                self.rep.stage(f"the trainer {why}: starting it again" + (f" from step {resume[1]}" if resume else ""))
                self._start_trainer(resume[0] if resume else None)
            case RestartServer():
                self.rep.stage("the student server died: starting it again")
                kill_actor(self.server)  # an unreachable but live server still holds the port
                try:
                    self._start_server()
                except BackpackError as e:  # e.g. its port not free yet: tried again on the next round
                    self.rep.stage(f"the student server could not start again ({e}); trying again shortly")
            case ServedVersion(version):
                with_retries(lambda: self.redis.hset(self.keys.server, "version", version),
                             "recording the served version", self.url)
            case Fail(message):
                raise BackpackError(message)

    def _respawn(self, name: str) -> None:
        """Start a dead teacher replica again and hand it to the scheduler (tried again next round if it fails)."""
        import ray

        from backpack.run.actors import spawn_teacher

        pool = self.gen.pool
        i, replica = next((i, r) for i, r in enumerate(pool.replicas) if r.name == name)
        cfg = next(t for t in self.cfg.teachers if t.name == replica.teacher)
        self.rep.stage(f"teacher replica {name} died: starting it again")
        kill_actor(replica.actor)
        actor = spawn_teacher(cfg, name, ledger=pool.ledger_for(cfg))
        try:
            ray.get(actor.ready.remote(), timeout=RESPAWN_TIMEOUT_S)
            fresh = pool.handle(cfg, actor, name)
            ray.get([s.replace_replica.remote(fresh) for s in [self.scheduler, *self.scorers]], timeout=30)
        except Exception as e:  # not placeable now, failed to load, or the scheduler is gone: next round
            kill_actor(actor)
            self.rep.stage(f"teacher replica {name} could not be started again ({cause_of(e)[:200]}); trying "
                           "again shortly")
            return
        pool.replicas[i] = fresh
        self.supervisor.respawned(name)
        self.gen.record_incidents({}, {name: "started again"})

    def _count(self, summary: dict) -> None:
        self.result.answered += summary.get("ok_rows", 0)
        self.result.failed += summary.get("failed_rows", 0)

    # ------------------------------------------------------------------ stopping

    def _shutdown(self) -> None:
        """Set the stop flag, let the scheduler store what teachers are answering and the trainer write its
        last checkpoint, stop the server; the session then kills what is left and leaves Ray."""
        import ray

        before = _checkpoints(self.files)
        try:
            self.redis.set(self.keys.stop, "1")
        except Exception:  # Redis gone: the parts are stopped below anyway
            pass
        if self.gate is not None:
            self.gate.stop()
        if self.scheduler is not None:
            self.scheduler.request_stop.remote()
            try:
                self._count(ray.get(self.scheduler_ref, timeout=300))
            except Exception as e:  # dead or stuck: its unstored prompts stay in the stream
                self.rep.stage(f"the scheduler did not stop cleanly ({type(e).__name__}); unstored prompts stay "
                               "in the intake for the next run")
        if self.trainer is not None:
            step = stop_trainer(self.trainer, self.files, before, self.rep.stage)
            if step is not None:
                self.result.step = step
        if self.server is not None:
            try:
                ray.get(self.server.stop.remote(), timeout=30)
            except Exception:
                pass
            kill_actor(self.server)
        try:
            self.redis.delete(self.keys.server)
            self.result.versions = sorted(m["version"] for m in self.registry.versions()
                                          if m["version"] not in self.known_versions)
            self.result.live = self.registry.live()
        except Exception:
            pass
        try:
            self.gen.record_counters()
        except Exception:  # storage or replicas gone: counters are a nicety
            pass


def _checkpoints(files) -> Optional[set]:
    """The Ray Train checkpoints of the run (their state files); None if the storage cannot be read."""
    try:
        return set(checkpoint_states(files))
    except Exception:
        return None


def stop_trainer(trainer, files, before: Optional[set], report: Callable[[str], None]) -> Optional[int]:
    """Wait for the continual trainer task `trainer` (the stop flag set) to write its last checkpoint and return;
    returns the step it stopped at (None when it did not return). `before`: the run's checkpoints when the stop
    began. Once a new checkpoint exists, Ray Train gets TRAINER_EXIT_S to end its run; past that the task is
    cancelled (nothing is lost: the checkpoint is what the next run resumes from) rather than letting a stuck
    shutdown hold the driver."""
    import ray

    deadline, written_at = time.monotonic() + TRAINER_STOP_S, None
    while time.monotonic() < deadline:
        done, _ = ray.wait([trainer], timeout=2.0)
        if done:
            try:
                res = ray.get(trainer)
                report(f"trainer stopped at step {res.step} (checkpoint {res.checkpoint})")
                return res.step
            except Exception as e:
                report(f"the trainer did not stop cleanly ({type(e).__name__}); the next run resumes from its "
                       "last checkpoint")
            return None
        if written_at is None and before is not None and (_checkpoints(files) or before) - before:
            written_at = time.monotonic()  # the stop's checkpoint: the trainer's work is safe
        if written_at is not None and time.monotonic() - written_at > TRAINER_EXIT_S:
            break
    ray.cancel(trainer, force=True)
    last = latest_checkpoint(files)
    report(f"the trainer did not return {'after writing its last checkpoint' if written_at else 'in time'}; "
           f"stopped it. The next run resumes from {f'step {last[1]}' if last else 'the start'}")
    return None
