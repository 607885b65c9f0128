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

- a prompt leaves the stream only once its answer is stored (see `backpack.intake`), so when the scheduler
  actor dies it is started again and reads what it had not stored; a dead teacher replica is respawned and
  handed to the scheduler, whose batches wait for it;
- the trainer checkpoints and publishes every K steps or T seconds; when it fails past training.max_failures
  it is started again from its last checkpoint;
- the server is started again when it dies, on the live version;
- stop: Ctrl-C (or SIGTERM, or the stop flag `backpack:<run>:control:stop` set by anyone) sets the stop flag;
  the scheduler stores what teachers are answering and leaves unsent prompts in the stream, the trainer writes
  its last checkpoint, then everything started here is stopped. Running the same command again resumes.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from backpack.core.accounting import INCIDENTS, REPLICAS, incident_lines
from backpack.core.config import ContinualConfig, EvalConfig, RunConfig, ServeConfig
from backpack.core.resources import bundle
from backpack.data.store import DatasetStore
from backpack.errors import BackpackError, InputError
from backpack.pipeline import Reporter, prepare_models, redis_for, run_lock
from backpack.runtime import ray_runtime
from backpack.runtime.redis_server import RunKeys, connect

WATCH_S = 1.0           # how often the driver looks at its parts
RESPAWN_TIMEOUT_S = 300.0  # a respawned teacher replica that is not ready by then is given up and tried again
MAX_TRAINER_RESTARTS = 5  # past this many trainer failures the run stops with the last error
TRAINER_STOP_S = 600.0    # at most this long for the trainer to write its last checkpoint after the stop flag
TRAINER_EXIT_S = 90.0     # and, once that checkpoint is written, this long for Ray Train to end the run


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


def _check(cfg: RunConfig) -> tuple[ContinualConfig, ServeConfig]:
    """Config checks a continual run needs beyond those of the config itself."""
    from backpack.distill import require_sections

    require_sections(cfg, "student", "training")
    tc = cfg.training
    if tc.kd_weight > 0 and cfg.decoding.logprobs < tc.top_k:
        raise InputError(f"training.kd_weight={tc.kd_weight} uses the teachers' top-{tc.top_k} logprobs, but "
                         f"decoding.logprobs={cfg.decoding.logprobs}: raise decoding.logprobs or lower "
                         "training.top_k (or set training.kd_weight: 0)")
    return cfg.continual or ContinualConfig(), cfg.serve or ServeConfig()


class ContinualRun:
    """The driver of one continual run (see the module docstring). `run()` blocks until stopped."""

    def __init__(self, cfg: RunConfig, reporter: Optional[Reporter] = None,
                 on_ready: Optional[Callable[[dict], None]] = None):
        self.cfg, self.rep, self.on_ready = cfg, reporter or Reporter(), on_ready
        self.cc, self.sc = _check(cfg)
        self.keys = RunKeys(cfg.name)
        self.result = ContinualResult()
        self._stop = threading.Event()

    def stop(self) -> None:
        """Stop the run from another thread (as Ctrl-C does)."""
        self._stop.set()

    # ------------------------------------------------------------------ the whole run

    def run(self) -> ContinualResult:
        t0 = time.perf_counter()
        with run_lock(self.cfg), redis_for(self.cfg) as url:
            self.url = url
            self.redis = connect(url)
            self.redis.delete(self.keys.stop)  # a new run: the last one's stop is done
            started_ray = False
            self.scheduler = self.trainer = self.server = None
            self.pool = None
            try:
                self.rep.stage("starting Ray" if ray_runtime.is_local(self.cfg.ray) else
                               f"connecting to Ray at {ray_runtime.target_address(self.cfg.ray)}")
                started_ray = ray_runtime.connect(self.cfg.ray)
                ray_runtime.check_shared_state(self.cfg)
                self._start()
                self._watch()
            except KeyboardInterrupt:
                self.rep.stage("stopping (Ctrl-C): storing the answers teachers are working on, writing the last "
                               "checkpoint")
            finally:
                self._shutdown()
                if started_ray:
                    import ray

                    ray.shutdown()
        self.result.seconds = time.perf_counter() - t0
        return self.result

    def _start(self) -> None:
        import ray

        from backpack.distill import latest_checkpoint, student_checks, training_group
        from backpack.ledger import run_ledger
        from backpack.mental.setup import prepare_recall
        from backpack.pool import TeacherPool
        from backpack.student.registry import Registry

        cfg = self.cfg
        self.pool = TeacherPool(cfg.teachers, run_ledger(cfg, self.url), cfg.ledger)
        server = bundle(self.sc.num_cpus, 0.0, self.sc.resources)
        ray_runtime.check_placement(self.pool.demands() + ([("student server", server)] if server else []),
                                    self.pool.groups() + [training_group(cfg.training)])
        if ray_runtime.is_local(cfg.ray):
            self.rep.stage("preparing models (a GGUF is converted once, then cached)")
            prepare_models(cfg)
        self.tc, self.same_tokenizer, _ = student_checks(cfg, self.rep)
        # prompts arrive later through the intake, so their tasks are not checked against the knowledge here
        self.recaller = prepare_recall(cfg, self.url, None, self.rep.stage)
        self.store = DatasetStore(str(cfg.dataset_dir))
        self.registry = Registry(self.url, cfg.name, cfg.files)
        self.known_versions = {m["version"] for m in self.registry.versions()}
        self._seed_prompts()
        self._start_server()  # first: a port already in use is a clear error before anything slow starts
        self.rep.stage(f"loading {sum(t.replicas for t in cfg.teachers)} teacher replica(s)")
        self.pool.start(report=self.rep.stage)
        if self.pool.not_started:  # the run goes on with the others; recorded for `backpack status` and the report
            cfg.files.append_text(INCIDENTS, incident_lines(self.pool.not_started, {}, time.time()))
        self._start_scheduler()
        resume = latest_checkpoint(cfg.files)
        self._start_trainer(resume[0] if resume else None)
        self.rep.stage("training continually" + (f" from step {resume[1]}" if resume else ""))
        self.gate = _GateThread(self)
        self.gate.start()
        ready = {"redis_url": self.url, "server_url": self.server_url, "run": cfg.name,
                 "ray_address": ray.get_runtime_context().gcs_address}
        self.rep.stage(f"serving the student at {self.server_url}/v1/chat/completions; push prompts with "
                       f"`backpack ingest CONFIG FILE|-`; Ctrl-C stops")
        if self.on_ready:
            self.on_ready(ready)

    def _seed_prompts(self) -> None:
        """The config's prompt collection, if any, is pushed to the intake first (once: duplicates are skipped,
        so a restart pushes nothing new)."""
        from backpack.core.prompts import read_prompts
        from backpack.intake import Intake

        p = self.cfg.prompts
        if not p or not p.path:
            return
        queries, rejected = read_prompts(p.path, self.cfg.decoding.params(), p.default_task, p.limit, p.max_chars)
        accepted, duplicates = Intake(self.url, self.cfg.name).push_many(queries)
        self.rep.stage(f"prompts from {p.path}: {accepted} pushed to the intake, {duplicates} already pushed"
                       + (f", {len(rejected)} rejected (bad records)" if rejected else ""))

    # ------------------------------------------------------------------ the parts

    def _start_scheduler(self) -> None:
        from backpack.actors import spawn_scheduler
        from backpack.core.types import OK
        from backpack.intake import IntakeSource
        from backpack.runtime.progress import RedisProgress

        sc = self.cfg.scheduler
        status = self.store.query_status()
        answered = {q for q, st in status.items() if st == OK}
        self.scheduler = spawn_scheduler(self.pool.replicas, self.store, RedisProgress(self.url, self.cfg.name),
                                         policy=sc.policy, max_retries=sc.max_retries, flush_rows=sc.flush_rows,
                                         flush_seconds=sc.flush_seconds, max_pending=sc.max_pending,
                                         ensemble=sc.ensemble, recall=self.recaller)
        # The same consumer name after a restart: the new scheduler first reads what the dead one had not stored.
        source = IntakeSource(self.url, self.cfg.name, answered, stored_ids=set(status))
        self.scheduler_ref = self.scheduler.run_stream.remote(source, self.cc.poll_seconds)

    def _start_trainer(self, resume_from: Optional[str]) -> None:
        from backpack.actors import spawn_continual_trainer
        from backpack.distill import grounded_only

        cfg = self.cfg
        self.trainer = spawn_continual_trainer(
            str(cfg.dataset_dir), cfg.student, self.tc, self.cc, cfg.files.sub("train"), cfg.name,
            redis_url=self.url, run=cfg.name, heldout_fraction=(cfg.eval or EvalConfig()).heldout_fraction,
            resume_from=resume_from, metrics_file=cfg.files.uri("train/metrics.jsonl"),
            same_tokenizer=self.same_tokenizer, registry=self.registry, grounded_only=grounded_only(cfg))

    def _start_server(self) -> None:
        import ray

        from backpack.actors import spawn_server

        student_recall = self.cfg.mental is not None and self.cfg.mental.student_recall
        self.server = spawn_server(self.cfg.student, self.sc, self.registry, model_name=self.cfg.name,
                                   recall=self.recaller if student_recall else None,
                                   default_task=self.cfg.prompts.default_task)
        try:
            self.server_url = ray.get(self.server.start.remote())
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, BackpackError):  # e.g. serve.port already in use: its own clear message
                raise e.cause from None
            raise BackpackError(f"the student server did not start: {type(e.cause).__name__}: {e.cause}") from None
        self.result.server_url = self.server_url
        self.redis.hset(self.keys.server, mapping={"url": self.server_url, "version": self.registry.live() or 0})

    def _restart(self, part: str) -> None:
        self.result.restarts[part] = self.result.restarts.get(part, 0) + 1

    # ------------------------------------------------------------------ watching

    def _watch(self) -> None:
        import ray

        while not self._stop.is_set():
            if self._stopping():
                self.rep.stage("stop requested: stopping")
                return
            self._watch_teachers()
            done, _ = ray.wait([self.scheduler_ref], timeout=0)
            if done:
                self._scheduler_ended()
            done, _ = ray.wait([self.trainer], timeout=0)
            if done:
                self._trainer_ended()
            self._watch_server()
            self._stop.wait(WATCH_S)

    def _watch_teachers(self) -> None:
        """Respawn the teacher replicas the scheduler found dead, and hand them to it."""
        import ray

        from backpack.actors import spawn_teacher
        from backpack.pool import kill_actor

        try:
            dead = set(ray.get(self.scheduler.dead_replicas.remote(), timeout=10))
        except ray.exceptions.RayError:
            return  # the scheduler itself is gone or busy: seen to elsewhere
        for i, replica in enumerate(self.pool.replicas):
            if replica.name not in dead:
                continue
            cfg = next(t for t in self.cfg.teachers if t.name == replica.teacher)
            self.rep.stage(f"teacher replica {replica.name} died: starting it again")
            kill_actor(replica.actor)
            actor = spawn_teacher(cfg, replica.name, ledger=self.pool.ledger_for(cfg))
            try:
                ray.get(actor.ready.remote(), timeout=RESPAWN_TIMEOUT_S)
                fresh = self.pool.handle(cfg, actor, replica.name)
                ray.get(self.scheduler.replace_replica.remote(fresh), timeout=30)
            except Exception as e:  # not placeable now, failed to load, or the scheduler is gone: next round
                ray.kill(actor, no_restart=True)
                self.rep.stage(f"teacher replica {replica.name} could not be started again ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''}); trying again shortly")
                continue
            self.pool.replicas[i] = fresh
            self._restart("teacher")
            self.cfg.files.append_text(INCIDENTS, incident_lines({}, {replica.name: "started again"}, time.time()))

    def _stopping(self) -> bool:
        """Whether the run is being stopped (a part that ended because of it is not restarted)."""
        return self._stop.is_set() or self.redis.get(self.keys.stop) == "1"

    def _scheduler_ended(self) -> None:
        import ray

        if self._stopping():
            return
        try:
            summary = ray.get(self.scheduler_ref)  # it returns only when asked to stop
            self._count(summary)
        except ray.exceptions.RayError as e:
            self.rep.stage(f"the scheduler died ({str(e).splitlines()[0][:200]}): starting it again; prompts it "
                           "had not stored are delivered again")
        ray.kill(self.scheduler, no_restart=True)  # a scheduler whose method raised is still alive: no leak
        self._restart("scheduler")
        self._start_scheduler()

    def _trainer_ended(self) -> None:
        import ray

        from backpack.distill import _last_error, latest_checkpoint

        if self._stopping():
            return
        try:
            res = ray.get(self.trainer)
            self.result.step = res.step
            why = "ended"
        except ray.exceptions.RayError as e:
            why = f"failed: {_last_error(e)}"
        self._restart("trainer")
        if self.result.restarts["trainer"] > MAX_TRAINER_RESTARTS:
            raise BackpackError(f"the continual trainer {why} {MAX_TRAINER_RESTARTS} times; stopping (rerun the "
                                "same command to resume from the last checkpoint)")
        resume = latest_checkpoint(self.cfg.files)
        self.rep.stage(f"the trainer {why}: starting it again" + (f" from step {resume[1]}" if resume else ""))
        self._start_trainer(resume[0] if resume else None)

    def _watch_server(self) -> None:
        import ray

        from backpack.pool import kill_actor

        try:
            info = ray.get(self.server.info.remote(), timeout=30)
        except ray.exceptions.GetTimeoutError:
            return  # busy loading a version: alive
        except ray.exceptions.RayError:
            self.rep.stage("the student server died: starting it again")
            kill_actor(self.server)  # an unreachable but live server still holds the port
            self._restart("server")
            try:
                self._start_server()
            except BackpackError as e:  # e.g. its port not free yet: tried again on the next round
                self.rep.stage(f"the student server could not start again ({e}); trying again shortly")
            return
        self.redis.hset(self.keys.server, "version", info["version"])

    def _count(self, summary: dict) -> None:
        self.result.answered += summary.get("ok_rows", 0)
        self.result.failed += summary.get("failed_rows", 0)

    # ------------------------------------------------------------------ stopping

    def _shutdown(self) -> None:
        """Set the stop flag, let the scheduler store what teachers are answering and the trainer write its
        last checkpoint, then stop everything this run started."""
        import ray

        if not ray.is_initialized():
            return
        before = self._checkpoints()
        try:
            self.redis.set(self.keys.stop, "1")
        except Exception:  # Redis gone: the parts are stopped below anyway
            pass
        if getattr(self, "gate", None) is not None:
            self.gate.stop()
        if self.scheduler is not None:
            self.scheduler.request_stop.remote()
            try:
                self._count(ray.get(self.scheduler_ref, timeout=300))
            except Exception as e:  # dead or stuck: its unstored prompts stay in the stream
                self.rep.stage(f"the scheduler did not stop cleanly ({type(e).__name__}); unstored prompts stay "
                               "in the intake for the next run")
        if self.trainer is not None:
            self._stop_trainer(before)
        if self.server is not None:
            try:
                ray.get(self.server.stop.remote(), timeout=30)
            except Exception:
                pass
        try:
            self.redis.delete(self.keys.server)
            self.result.versions = sorted(m["version"] for m in self.registry.versions()
                                          if m["version"] not in self.known_versions)
            self.result.live = self.registry.live()
        except Exception:
            pass
        for actor in (self.scheduler, self.server):
            if actor is not None:
                ray.kill(actor)
        if self.pool is not None:
            try:  # retries, rate-limit waits, ledger hits: for `backpack status` and the report
                self.cfg.files.write_text(REPLICAS, json.dumps(self.pool.counters()))
            except Exception:  # storage or replicas gone: counters are a nicety
                pass
            self.pool.shutdown()


    def _checkpoints(self) -> Optional[set]:
        """The Ray Train checkpoints of the run (their state files); None if the storage cannot be read."""
        from backpack.distill import checkpoint_states

        try:
            return set(checkpoint_states(self.cfg.files))
        except Exception:
            return None

    def _stop_trainer(self, before: Optional[set]) -> None:
        """Wait for the trainer to write its last checkpoint and return. Once that checkpoint exists, Ray Train
        gets TRAINER_EXIT_S to end its run; past that the task is cancelled (nothing is lost: the checkpoint is
        what the next run resumes from) rather than letting a stuck shutdown hold the driver."""
        import ray

        deadline, written_at = time.monotonic() + TRAINER_STOP_S, None
        while time.monotonic() < deadline:
            done, _ = ray.wait([self.trainer], timeout=2.0)
            if done:
                try:
                    res = ray.get(self.trainer)
                    self.result.step = res.step
                    self.rep.stage(f"trainer stopped at step {res.step} (checkpoint {res.checkpoint})")
                except Exception as e:
                    self.rep.stage(f"the trainer did not stop cleanly ({type(e).__name__}); the next run resumes "
                                   "from its last checkpoint")
                return
            if written_at is None and before is not None and (self._checkpoints() or before) - before:
                written_at = time.monotonic()  # the stop's checkpoint: the trainer's work is safe
            if written_at is not None and time.monotonic() - written_at > TRAINER_EXIT_S:
                break
        from backpack.distill import latest_checkpoint

        ray.cancel(self.trainer, force=True)
        last = latest_checkpoint(self.cfg.files)
        self.rep.stage(f"the trainer did not return {'after writing its last checkpoint' if written_at else 'in time'}"
                       f"; stopped it. The next run resumes from {f'step {last[1]}' if last else 'the start'}")


class _GateThread:
    """Judges each version the trainer publishes (promote or keep) in a thread of the driver, in order."""

    def __init__(self, run: ContinualRun):
        self.run_, self._stop = run, threading.Event()
        self.thread = threading.Thread(target=self._loop, name="promotion-gate", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=120)

    def _loop(self) -> None:
        from backpack.eval.gate import Gate

        run = self.run_
        gate = Gate(run.cfg, run.registry, threads=1)
        waiting_for_rows = None  # (version, dataset version) of a version kept for want of held-out rows
        while not self._stop.is_set():
            version = None
            try:  # nothing here may end the thread: a Redis hiccup or a broken version is retried later
                version = self._next_version()
                data = run.store.version
                if version is None or waiting_for_rows == (version, data):
                    self._stop.wait(WATCH_S)
                    continue
                record = gate.judge(version)
                run.rep.stage(f"student version {version}: {record['decision']} ({record['reason']})")
                waiting_for_rows = (version, data) if not record["rows"] else None
            except Exception as e:  # noqa: BLE001
                run.rep.stage(f"the promotion gate could not judge version {version}: {type(e).__name__}: {e}")
                self._stop.wait(WATCH_S * 10)

    def _next_version(self) -> Optional[int]:
        """The newest version newer than the live one that is not judged yet (or was kept only for want of
        held-out rows). Older unjudged versions are superseded by it: judging them would only delay it."""
        live = self.run_.registry.live() or 0
        for meta in sorted(self.run_.registry.versions(), key=lambda m: -m["version"]):
            if meta["version"] <= live:
                return None
            gate = meta.get("gate")
            if gate is None or (gate.get("decision") == "kept" and not gate.get("rows")):
                return meta["version"]
            return None  # the newest version is judged: nothing to do until the next one
        return None
