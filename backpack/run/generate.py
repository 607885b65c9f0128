"""`backpack generate`: answer the run's prompt collection with its teachers into its versioned dataset.

prompts -> scheduler actor -> teacher actors -> DatasetStore, on Ray with Redis. The config is already
validated; everything that can be checked without starting actors (prompt file, knowledge pack, model files,
placement) is checked before any actor starts, and everything started here (Ray, embedded Redis, actors) is
stopped on the way out, on error and on Ctrl-C too. Re-running the same config resumes: prompts already
answered are skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from backpack.config import RunConfig
from backpack.core.schema import completions_to_table, queries_to_table
from backpack.core.types import OK, Completion
from backpack.data.prompts import read_prompts
from backpack.data.store import DatasetStore
from backpack.errors import BackpackError, cause_of
from backpack.run.generation import Generation, wait_with_progress
from backpack.run.synthesize import prompt_file
from backpack.runtime.progress import RedisProgress, Reporter
from backpack.runtime.session import RunSession


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


def generate(cfg: RunConfig, reporter: Optional[Reporter] = None) -> GenerateResult:
    """Answer the run's prompt collection with its teachers into `cfg.dataset_dir`. Re-running the same
    config resumes: Queries already answered are skipped. One run of a name at a time."""
    rep = reporter or Reporter()
    t0 = time.perf_counter()
    with RunSession(cfg, rep) as session:
        queries, rejected = read_prompts(prompt_file(cfg), cfg.decoding.params(), cfg.prompts.default_task,
                                         cfg.prompts.limit, cfg.prompts.max_chars,
                                         cfg.prompts.override_caps(cfg.decoding))
        store = DatasetStore(str(cfg.dataset_dir))
        stored = store.query_status()  # resume: skip what is answered; record a bad record once
        todo = [q for q in queries if stored.get(q.id) != OK]
        new_rejected = [r for r in rejected if r.query.id not in stored]
        result = GenerateResult(dataset=str(cfg.dataset_dir), version=store.version, queries=len(todo),
                                skipped=len(queries) - len(todo), rejected=len(new_rejected), ok_rows=0,
                                failed_rows=0, tokens=0, seconds=0.0)
        if new_rejected:
            store.append(completions_to_table([r.query for r in new_rejected],
                                              [Completion.failed(r.query.id, "(none)", r.reason)
                                               for r in new_rejected]))
            result.failed_rows += len(new_rejected)
        if todo:
            _answer(session, store, todo, result)
    result.version = store.version
    result.seconds = time.perf_counter() - t0
    return result


def _answer(session: RunSession, store: DatasetStore, todo: list, result: GenerateResult) -> None:
    """Have the teachers answer `todo` into `store`; their counts go to `result`."""
    import ray

    cfg, rep = session.cfg, session.rep
    # the knowledge pack is checked and imported before any teacher loads (a bad pack fails fast)
    gen = Generation.started(session, {q.task for q in todo})
    progress = RedisProgress(session.redis_url, cfg.name)
    progress.start(total=len(todo) * cfg.decoding.n * cfg.scheduler.answers_per_query())
    scheduler = gen.spawn_scheduler(store, progress)
    rep.stage(f"generating {len(todo)} prompt(s)")
    try:
        summary = wait_with_progress(scheduler.run.remote(queries_to_table(todo)), progress, rep)
    except ray.exceptions.RayActorError as e:
        progress.finish("failed")
        raise BackpackError(f"the scheduler actor died ({cause_of(e)}); answers stored so far "
                            f"are kept: rerun the same command to resume") from None
    progress.finish()
    gen.record_counters()
    result.ok_rows += summary["ok_rows"]
    result.failed_rows += summary["failed_rows"]
    result.tokens = summary["tokens"]
    result.generate_seconds = summary["seconds"]
    result.dead_replicas = summary["dead_replicas"]
    result.not_started = dict(gen.pool.not_started)
    gen.record_incidents({}, result.dead_replicas)
