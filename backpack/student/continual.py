"""Continual training: one Ray Train run that does not end when the data does.

Each worker follows the DatasetStore itself (the run's storage is a shared path; Ray Data would end with its
input). Rank 0 decides, every `continual.poll_seconds` while idle and after every optimizer step, what all
workers do next, and broadcasts the decision so every DDP worker makes the same steps:

- new shards (store version > the last version trained on): their trainable rows (answered, not held out,
  with a usable example) are shuffled into batches of `training.batch_size` rows per worker, in which a share
  `continual.replay_ratio` is sampled from the rows of versions already trained on (see `plan_batches`); each
  new row is trained on once, then the last seen version moves up to the newest of those shards;
- a new student version (checkpoint + registry publish, as the batch loop does) every
  `continual.publish_every_steps` optimizer steps, or once `continual.publish_every_seconds` have passed
  since the last one and a step was made since (also while idle, so the last steps are never left unpublished);
- the stop flag (Redis `backpack:<run>:control:stop` = "1"): a final checkpoint (published when steps were
  made since the last version) and the run ends normally.

Resume: a checkpoint's state holds "step", "dataset_version" (the last version trained on to the end) and
"partial" (the range being trained and how many of its planned batches were done). The plan of a range is
deterministic (seeded by training.seed and the range), so a restarted worker group (FailureConfig) or a rerun
(`resume_from`) skips exactly the batches already done and never retrains an earlier version.

In continual mode training.max_steps is ignored (the run ends on the stop flag only), and the learning rate is
constant after training.warmup_steps (training.schedule is ignored: an endless run has no total to decay to).
`grad_accum` micro-batches make a step; the last step of a range may have fewer (its gradient is not held back
waiting for data that may not come).

Freshness log (rank 0, `freshness.jsonl` beside the metrics file): one line per optimizer step,
{"step", "time" (unix seconds when the step finished), "new_versions" (dataset versions whose new rows the
step trained on), "new_rows", "replay_rows", "dataset_version"}. After a restart, steps past the restored
checkpoint are made (and logged) again: the last line of a step is the one the model kept.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from backpack.config import ContinualConfig, StudentConfig, TrainingConfig
from backpack.student.trainer import TrainResult, WorkerSession, fit_workers, micro_batch

FRESHNESS_LOG = "freshness.jsonl"
log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One planned micro-batch: rows new to the trainer and rows replayed from versions already trained on."""
    new: list = field(default_factory=list)
    replay: list = field(default_factory=list)

    @property
    def rows(self) -> list:
        return self.new + self.replay


def _stochastic_round(x: float, rng: random.Random) -> int:
    """floor(x) or floor(x) + 1, the latter with probability frac(x): the mean is exactly x."""
    base = int(x)
    return base + (rng.random() < x - base)


def plan_batches(new_rows: Sequence, old_rows: Sequence, batch_size: int, replay_ratio: float,
                 rng: random.Random) -> list[Batch]:
    """Batches that train on every row of `new_rows` once (shuffled by `rng`), each of `batch_size` rows of
    which on average a share `replay_ratio` is sampled from `old_rows` (without replacement within a batch
    when there are enough). No replay without old rows or with ratio 0. A batch always holds >= 1 new row; the
    last one may be short of new rows, and then takes replay rows in proportion to the new ones it has."""
    new, old = list(new_rows), list(old_rows)
    rng.shuffle(new)
    replay = replay_ratio if old else 0.0
    per_new = replay / (1.0 - replay)  # replay rows per new row
    out, i = [], 0
    while i < len(new):
        n_replay = min(batch_size - 1, _stochastic_round(batch_size * replay, rng))
        chunk = new[i: i + batch_size - n_replay]
        i += len(chunk)
        if len(chunk) < batch_size - n_replay:
            n_replay = min(n_replay, _stochastic_round(len(chunk) * per_new, rng))
        picked = rng.sample(old, n_replay) if n_replay <= len(old) else rng.choices(old, k=n_replay)
        out.append(Batch(chunk, picked))
    return out


def worker_slice(rows: list, rank: int, world: int) -> list:
    """This worker's share of a global batch: every world-th row. A batch with fewer rows than workers is
    cycled first, so every DDP worker has a micro-batch (each must make the same backward passes)."""
    if len(rows) < world:
        rows = [rows[i % len(rows)] for i in range(world)]
    return rows[rank::world]


def freshness_path(metrics_file: str | os.PathLike) -> Path | str:
    """Where the per-step freshness log of a continual run with this metrics file is written (a URI when the
    metrics file is one)."""
    from backpack.data.storage import is_uri, sibling

    where = sibling(metrics_file, FRESHNESS_LOG)
    return where if is_uri(where) else Path(where)


class _Examples:
    """The store's usable training examples per dataset version, each shard read and tokenised once."""

    def __init__(self, store_uri: str, heldout_fraction: float, session: WorkerSession, grounded_only: bool = False):
        self.uri, self.fraction, self.session = store_uri, heldout_fraction, session
        self.grounded_only = grounded_only
        self.store = None
        self.by_version: dict[int, list] = {}

    def version(self) -> int:
        """The store's current version (0 while the dataset does not exist yet)."""
        from backpack.data.store import DatasetStore
        from backpack.errors import DatasetError

        if self.store is None:
            try:
                self.store = DatasetStore(self.uri, create=False)
            except DatasetError:
                return 0
        return self.store.version

    def between(self, lo: int, hi: int) -> list[tuple[int, object, dict]]:
        """(version, Example, its row) for the trainable rows of versions lo+1 .. hi, in store order (the row's
        prompt is what an on-policy step samples from)."""
        import pyarrow.parquet as pq

        from backpack.data.splits import training_rows

        self.version()
        for entry in self.store.manifest().upto(hi) if hi > lo else []:
            if entry.version > lo and entry.version not in self.by_version:
                table = pq.read_table(self.store.shard_paths([entry])[0], filesystem=self.store.fs)
                rows = training_rows(table, self.fraction, self.grounded_only).to_pylist()
                self.by_version[entry.version] = [(ex, row) for row in rows for ex in self.session.examples([row])]
        return [(v, ex, row) for v in range(lo + 1, hi + 1) for ex, row in self.by_version.get(v, [])]


class _Control:
    """Rank 0's view of the outside (the stop flag in Redis) and the broadcast that makes every worker act on
    rank 0's decision."""

    def __init__(self, redis_url: Optional[str], run: str, rank: int, world: int):
        from backpack.runtime.redis_server import RunKeys

        self.url, self.key, self.rank, self.world = redis_url, RunKeys(run).stop, rank, world
        self._client = None

    def stop_requested(self) -> bool:
        """Whether the stop flag is set (rank 0 asks Redis; a Redis error reads as "no", and is logged)."""
        import redis

        from backpack.errors import RedisUnavailableError
        from backpack.runtime.redis_server import connect

        if self.rank != 0 or not self.url:
            return False
        try:
            if self._client is None:
                self._client = connect(self.url)
            return self._client.get(self.key) == "1"
        except (redis.exceptions.RedisError, RedisUnavailableError) as e:
            log.warning("continual trainer: cannot read the stop flag: %s", e)
            return False

    def agree(self, decision):
        """Rank 0's `decision`, on every worker."""
        if self.world == 1:
            return decision
        import torch.distributed as dist

        box = [decision]
        dist.broadcast_object_list(box, src=0)
        return box[0]


class _ContinualLoop:
    """The state of one worker's endless loop: what it has trained on, when it last published."""

    def __init__(self, config: dict):
        self.s = WorkerSession(config, schedule="constant")
        self.cc = ContinualConfig(**config["continual"])
        self.on_policy = None  # on-policy steps on the intake's prompts (training.objective on_policy or mixed)
        if self.s.tc.objective != "off_policy":
            from backpack.student.on_policy import OnPolicyWorker

            self.on_policy = OnPolicyWorker(self.s, config)
        self.config = config
        self.data = _Examples(config["store_uri"], config["heldout_fraction"], self.s,
                              config.get("grounded_only", False))
        self.control = _Control(config.get("redis_url"), config["run"], self.s.rank, self.s.world)
        state = self.s.state or {}
        self.seen = int(state.get("dataset_version") or 0)
        self.partial: Optional[dict] = state.get("partial")
        self.since_publish = 0                    # optimizer steps since the last published version
        self.published_at = time.monotonic()
        self.window_versions: set[int] = set()    # "trained_versions" of the next metrics line
        metrics_file = config.get("metrics_file")
        self.freshness = freshness_path(metrics_file) if metrics_file and self.s.rank == 0 else None

    # ------------------------------------------------------------ decisions (rank 0)

    def _publish_due(self) -> bool:
        return self.since_publish >= self.cc.publish_every_steps or (
            self.since_publish > 0 and time.monotonic() - self.published_at >= self.cc.publish_every_seconds)

    def _next(self) -> dict:
        """What to do when no range is being trained."""
        if self.partial:
            return {"do": "train", **self.partial}
        latest = self.data.version()
        if latest > self.seen:
            return {"do": "train", "upto": latest, "rows_per_batch": self.s.tc.batch_size * self.s.world,
                    "done": 0}
        if self.control.stop_requested():
            return {"do": "stop"}
        return {"do": "publish" if self._publish_due() else "idle"}

    def _after_step(self) -> str:
        if self.control.stop_requested():
            return "stop"
        if self._publish_due():
            return "publish"
        return "log" if self.s.step % self.s.tc.log_every == 0 else ""

    # ------------------------------------------------------------ actions (every worker)

    def run(self) -> None:
        while True:
            d = self.control.agree(self._next() if self.s.rank == 0 else None)
            if d["do"] == "train":
                if self._train_range(d["upto"], d["rows_per_batch"], d["done"]):
                    return
            elif d["do"] == "stop":
                self._checkpoint(publish=self.since_publish > 0)
                return
            elif d["do"] == "publish":
                self._checkpoint(publish=True)
            else:
                time.sleep(self.cc.poll_seconds)

    def _train_range(self, upto: int, rows_per_batch: int, done: int) -> bool:
        """Train on the new rows of versions seen+1 .. upto with replay, from planned batch `done` on.
        Returns True when a stop request ended the run."""
        tc, s = self.s.tc, self.s
        rng = random.Random(f"{tc.seed}:{self.seen}:{upto}")  # the same plan on every worker and every resume
        plan = plan_batches(self.data.between(self.seen, upto), self.data.between(0, self.seen), rows_per_batch,
                            self.cc.replay_ratio, rng)
        versions: set[int] = set()
        new_rows = replay_rows = 0
        for k in range(done, len(plan)):
            batch = plan[k]
            items = worker_slice(batch.rows, s.rank, s.world)
            micro_batch(s, [row for _, _, row in items], self.on_policy, time.perf_counter(),
                        examples=[ex for _, ex, _ in items])
            versions.update(v for v, _, _ in batch.new)
            new_rows, replay_rows = new_rows + len(batch.new), replay_rows + len(batch.replay)
            if (k + 1) % tc.grad_accum and k + 1 < len(plan):
                continue
            s.optimizer_step()
            self.since_publish += 1
            self.window_versions |= versions
            finished = k + 1 == len(plan)
            self.partial = None if finished else {"upto": upto, "rows_per_batch": rows_per_batch, "done": k + 1}
            if finished:
                self.seen = upto
            self._log_step(sorted(versions), new_rows, replay_rows)
            versions, new_rows, replay_rows = set(), 0, 0
            action = self.control.agree(self._after_step() if s.rank == 0 else None)
            if action == "stop":
                self._checkpoint(publish=True)
                return True
            if action == "publish":
                self._checkpoint(publish=True)
            elif action == "log":
                s.report(self._metrics())
        self.partial, self.seen = None, upto  # also when the range held no usable rows (no steps)
        return False

    def _log_step(self, versions: list[int], new_rows: int, replay_rows: int) -> None:
        from backpack.data.storage import append_text

        if self.freshness is None:
            return
        line = {"step": self.s.step, "time": time.time(), "new_versions": versions, "new_rows": new_rows,
                "replay_rows": replay_rows, "dataset_version": self.seen}
        append_text(self.freshness, json.dumps(line) + "\n")

    def _metrics(self) -> dict:
        """The window's metrics, or the last ones when no step was made since (an idle publish or stop)."""
        s = self.s
        if s.window["micro"] or s.last_metrics is None:
            metrics = s.window_metrics()
        else:
            metrics = {**s.last_metrics, "lr": s.sched.get_last_lr()[0]}
        metrics.update(step=s.step, time=time.time(), dataset_version=self.seen,
                       trained_versions=sorted(self.window_versions), **(self.on_policy.counts if self.on_policy else {}))
        self.window_versions = set()
        return metrics

    def _checkpoint(self, publish: bool) -> None:
        """A checkpoint of the model and of the loop's position; a registry version too when `publish`."""
        state = {"dataset_version": self.seen, "partial": self.partial,
                 **(self.on_policy.checkpoint_state() if self.on_policy else {})}
        self.s.report(self._metrics(), checkpoint_state=state, publish=publish)
        if publish:
            self.since_publish, self.published_at = 0, time.monotonic()


def continual_loop_per_worker(config: dict) -> None:
    """Runs inside each Ray Train worker until the stop flag is set (see the module docstring)."""
    _ContinualLoop(config).run()


def _absolute(path: Optional[str | os.PathLike]) -> Optional[str]:
    """A local path made absolute on the driver (workers run in other directories); URIs as they are."""
    if path is None or "://" in str(path):
        return None if path is None else str(path)
    return str(Path(path).expanduser().resolve())


def run_continual_training(store_uri: str | os.PathLike, student: StudentConfig, training: TrainingConfig,
                           continual: ContinualConfig, storage, name: str,
                           redis_url: Optional[str], run: str, heldout_fraction: float,
                           resume_from: Optional[str] = None, metrics_file: Optional[str] = None,
                           same_tokenizer: bool = True, registry=None, grounded_only: bool = False,
                           on_policy: Optional[dict] = None, test_hooks: Optional[dict] = None) -> TrainResult:
    """Train the student on the DatasetStore at `store_uri` as shards land, until the stop flag of run `run`
    is set in the Redis at `redis_url` (None: no stop flag; the run then ends only when killed). Blocks; each
    call is a new Ray Train run under `storage` (a folder, a URI or a RunFiles). `resume_from` (a checkpoint of
    an earlier run, continual or batch; a folder or a URI) continues its step count and skips the dataset
    versions it trained on. Rows held out by `heldout_fraction` are never trained on, nor, with `grounded_only`,
    answers not grounded in their recalled context. With training.objective on_policy or mixed, `on_policy`
    holds the schedulers that score the student's samples (see `backpack.student.trainer.run_training`).
    Returns the final checkpoint and step."""
    config = {"student": student.model_dump(), "training": training.model_dump(),
              "continual": continual.model_dump(), "store_uri": _absolute(store_uri),
              "heldout_fraction": heldout_fraction, "redis_url": redis_url, "run": run,
              "resume_from": _absolute(resume_from), "metrics_file": _absolute(metrics_file),
              "same_tokenizer": same_tokenizer, "registry": registry, "grounded_only": grounded_only,
              "on_policy": on_policy, **(test_hooks or {})}
    return fit_workers(continual_loop_per_worker, config, training, storage, name)
