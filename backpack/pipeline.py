"""Wires one Run together: prompts -> scheduler -> teacher pool -> DatasetStore, on Ray with Redis.

`generate(cfg)` is what `backpack generate` and the Ray Job entry point call. The config is already validated;
everything that can be checked without starting actors (prompt file, model files, placement) is checked before
any actor starts, and everything started here (Ray, embedded Redis, actors) is stopped on the way out, on error
and on Ctrl-C too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from backpack.core.accounting import INCIDENTS, REPLICAS, incident_lines
from backpack.core.config import RunConfig
from backpack.core.prompts import read_prompts
from backpack.core.schema import completions_to_table, queries_to_table
from backpack.core.types import OK, Completion
from backpack.data.store import DatasetStore
from backpack.errors import BackpackError, InputError
from backpack.runtime import ray_runtime
from backpack.runtime.progress import RedisProgress
from backpack.runtime.redis_server import EmbeddedRedis, connect, with_password


@dataclass
class GenerateResult:
    dataset: str
    version: int
    queries: int          # Queries sent to teachers in this run
    skipped: int          # already answered in an earlier run of the same config (resume)
    rejected: int         # bad prompt records, stored as failed rows
    ok_rows: int
    failed_rows: int
    tokens: int
    seconds: float                 # the whole run: start-up, model loading, generation
    generate_seconds: float = 0.0  # from the first batch sent to the last answer stored
    dead_replicas: dict = field(default_factory=dict)  # replica -> cause: died during the run, work re-routed
    not_started: dict = field(default_factory=dict)    # replica -> cause: could not start, the run went on

    @property
    def tokens_per_s(self) -> float:
        """Generation throughput (start-up and model loading excluded)."""
        return self.tokens / self.generate_seconds if self.generate_seconds else 0.0


class Reporter:
    """Progress callbacks; the CLI passes one that draws bars, library users get silence."""

    def stage(self, text: str) -> None: ...

    def progress(self, done: int, failed: int, total: int, tokens: int, seconds: float) -> None: ...


@contextlib.contextmanager
def run_lock(cfg: RunConfig):
    """Hold `<run_dir>/.lock` for the run: two runs of one name would write one dataset and one Redis AOF."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.run_dir / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise InputError(f"run {cfg.name!r} is already running (lock held on {path}, pid {f.read().strip()})") \
                from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield


ENDPOINT_FILE = "endpoint.json"  # in <run_dir>/redis/: where a live run's embedded Redis listens


@contextlib.contextmanager
def redis_for(cfg: RunConfig):
    """The run's Redis URL: an embedded server started for the run, or the configured one (checked).

    While an embedded server runs, `<run_dir>/redis/endpoint.json` (owner-only: the URL holds the password)
    says where, so `backpack ingest`, `status`, `promote`... reach the live run (see `attach_redis`)."""
    if cfg.redis.url is None:
        with EmbeddedRedis(cfg.run_dir / "redis") as server:
            endpoint = cfg.run_dir / "redis" / ENDPOINT_FILE
            fd = os.open(endpoint, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"url": server.url, "pid": os.getpid()}, f)
            try:
                yield server.url
            finally:
                endpoint.unlink(missing_ok=True)
    else:
        url = with_password(cfg.redis.url, cfg.redis.password_env)
        connect(url).close()
        yield url


def _live_endpoint(cfg: RunConfig) -> Optional[str]:
    """The URL of the embedded Redis of a live run of `cfg`, if one is running and answers."""
    path = cfg.run_dir / "redis" / ENDPOINT_FILE
    try:
        endpoint = json.loads(path.read_text())
        os.kill(int(endpoint["pid"]), 0)  # the run's process is alive (a stale file is left by a kill -9)
        connect(endpoint["url"], timeout=2.0).close()
        return endpoint["url"]
    except (OSError, ValueError, KeyError, BackpackError):
        return None


@contextlib.contextmanager
def attach_redis(cfg: RunConfig):
    """The run's Redis for a command beside the run (ingest, status, versions, promote, rollback): the
    configured server; else the embedded server of the live run; else, with no run live, the run's embedded
    server started from its AOF for the command (under the run lock, so a run cannot start on it meanwhile)."""
    if cfg.redis.url is not None:
        url = with_password(cfg.redis.url, cfg.redis.password_env)
        connect(url).close()
        yield url
        return
    url = _live_endpoint(cfg)
    if url is not None:
        yield url
        return
    with run_lock(cfg), redis_for(cfg) as url:
        yield url


def prepare_models(cfg: RunConfig) -> None:
    """On a local cluster, resolve (and for GGUF, convert once) each teacher's model in this process, so a
    missing or broken model is one clear error before any actor starts, and replicas all load the cache."""
    from backpack.teachers.loader import resolve_model

    for t in cfg.teachers:
        if t.backend == "hf":
            resolve_model(t.model)


def generate(cfg: RunConfig, reporter: Optional[Reporter] = None) -> GenerateResult:
    """Answer the run's prompt collection with its teachers into `cfg.dataset_dir`. Re-running the same
    config resumes: Queries already answered are skipped. One run of a name at a time."""
    with run_lock(cfg):
        return _generate(cfg, reporter)


def _generate(cfg: RunConfig, reporter: Optional[Reporter]) -> GenerateResult:
    import ray

    from backpack.actors import spawn_scheduler
    from backpack.ledger import run_ledger
    from backpack.mental.setup import prepare_recall
    from backpack.pool import TeacherPool

    rep = reporter or Reporter()
    t0 = time.perf_counter()
    queries, rejected = read_prompts(cfg.prompts.path, cfg.decoding.params(), cfg.prompts.default_task,
                                     cfg.prompts.limit, cfg.prompts.max_chars)
    store = DatasetStore(str(cfg.dataset_dir))
    stored = store.query_status()  # resume: skip what is answered; record a bad record once
    todo = [q for q in queries if stored.get(q.id) != OK]
    new_rejected = [r for r in rejected if r.query.id not in stored]
    result = GenerateResult(dataset=str(cfg.dataset_dir), version=store.version, queries=len(todo),
                            skipped=len(queries) - len(todo), rejected=len(new_rejected), ok_rows=0,
                            failed_rows=0, tokens=0, seconds=0.0)
    if new_rejected:
        store.append(completions_to_table([r.query for r in new_rejected],
                                          [Completion.failed(r.query.id, "(none)", r.reason) for r in new_rejected]))
        result.failed_rows += len(new_rejected)
    if not todo:
        result.version = store.version
        result.seconds = time.perf_counter() - t0
        return result

    started_ray, scheduler = False, None
    with redis_for(cfg) as redis_url:
        pool = TeacherPool(cfg.teachers, run_ledger(cfg, redis_url), cfg.ledger)
        # the knowledge pack is checked and imported before any teacher loads (a bad pack fails fast)
        recaller = prepare_recall(cfg, redis_url, {q.task for q in todo}, rep.stage)
        try:
            local = ray_runtime.is_local(cfg.ray)
            rep.stage("starting Ray" if local else f"connecting to Ray at {ray_runtime.target_address(cfg.ray)}")
            started_ray = ray_runtime.connect(cfg.ray)
            ray_runtime.check_shared_state(cfg)
            ray_runtime.check_placement(pool.demands(), pool.groups())
            if local:
                rep.stage("preparing teacher models (a GGUF is converted once, then cached)")
                prepare_models(cfg)
            n = sum(t.replicas for t in cfg.teachers)
            rep.stage(f"loading {n} teacher replica(s)")
            pool.start(report=rep.stage)
            progress = RedisProgress(redis_url, cfg.name)
            progress.start(total=len(todo) * cfg.decoding.n * cfg.scheduler.answers_per_query())
            scheduler = spawn_scheduler(pool.replicas, store, progress, policy=cfg.scheduler.policy,
                                        max_retries=cfg.scheduler.max_retries, flush_rows=cfg.scheduler.flush_rows,
                                        max_pending=cfg.scheduler.max_pending, ensemble=cfg.scheduler.ensemble,
                                        recall=recaller)
            rep.stage(f"generating {len(todo)} prompt(s)")
            try:
                summary = _wait_with_progress(scheduler.run.remote(queries_to_table(todo)), progress, rep)
            except ray.exceptions.RayActorError as e:
                progress.finish("failed")
                raise BackpackError(f"the scheduler actor died ({str(e).splitlines()[0]}); answers stored so far "
                                    f"are kept: rerun the same command to resume") from None
            progress.finish()
            # retries, rate-limit waits, ledger hits: for `backpack status` and the report
            cfg.files.write_text(REPLICAS, json.dumps(pool.counters()))
        finally:
            # On a shared cluster nothing of this run may outlive it: kill what we spawned, then leave Ray.
            if scheduler is not None:
                ray.kill(scheduler)
            pool.shutdown()
            if started_ray:
                ray.shutdown()
    result.ok_rows += summary["ok_rows"]
    result.failed_rows += summary["failed_rows"]
    result.tokens = summary["tokens"]
    result.generate_seconds = summary["seconds"]
    result.dead_replicas = summary["dead_replicas"]
    result.not_started = dict(pool.not_started)
    if result.dead_replicas or result.not_started:  # for `backpack status` and the report
        cfg.files.append_text(INCIDENTS, incident_lines(result.not_started, result.dead_replicas, time.time()))
    result.version = store.version
    result.seconds = time.perf_counter() - t0
    return result


def _wait_with_progress(ref, progress: RedisProgress, rep: Reporter) -> dict:
    import ray

    start = time.perf_counter()
    while True:
        done, _ = ray.wait([ref], timeout=0.5)
        p = progress.read()
        rep.progress(int(p.get("done", 0)), int(p.get("failed", 0)), int(p.get("total", 0)),
                     int(p.get("tokens", 0)), time.perf_counter() - start)
        if done:
            return ray.get(ref)

