"""The continual trainer (`backpack.student.continual`).

Without Ray: `plan_batches` trains on every new row exactly once, in batches of at most `batch_size` rows with at
least one new row each, mixing in on average a share `replay_ratio` of rows already trained on (none when there
are none, or with ratio 0), the same plan for the same seed; `worker_slice` gives every DDP rank a micro-batch;
the trainer's reader of the store leaves out held-out and failed rows.

With Ray (real Ray Train, the embedded Redis, a DatasetStore filled by a tiny HF teacher), one test shows a run's
whole life in two `run_continual_training` calls:
1. a run that starts on a store with one shard trains on it, picks up a shard appended while it runs (with
   replay from the first), publishes registry versions every few steps, and ends on the Redis stop flag with a
   final checkpoint of the last dataset version and step; it never trains on held-out rows;
2. a rerun resumed from that checkpoint skips the versions already trained on, trains on a third shard, survives
   a worker crash (restarted by FailureConfig), and ends on the stop flag further along.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from backpack.config import ContinualConfig, StudentConfig, TeacherConfig, TrainingConfig
from backpack.core.schema import failed_table, queries_to_table
from backpack.core.types import DecodingParams, Query
from backpack.data.splits import is_heldout
from backpack.data.store import DatasetStore
from backpack.student.continual import _Examples, freshness_path, plan_batches, run_continual_training, worker_slice

HELDOUT = 0.25
ROWS_PER_SHARD = 8
WAIT_S = 300  # generous: other heavy tests may share this machine's two cores


# ------------------------------------------------------------------ plan_batches and worker_slice (no Ray)

NEW = [("new", i) for i in range(50)]
OLD = [("old", j) for j in range(20)]


@pytest.mark.parametrize("batch_size,ratio", [(1, 0.5), (2, 0.5), (3, 0.0), (8, 0.25), (8, 0.3), (5, 0.9)])
def test_plan_batches_trains_every_new_row_once_in_bounded_batches(batch_size, ratio):
    plan = plan_batches(NEW, OLD, batch_size, ratio, random.Random(1))
    trained = [r for b in plan for r in b.new]
    assert sorted(trained) == sorted(NEW)  # each new row exactly once, nothing else counted as new
    for b in plan:
        assert 1 <= len(b.new) and len(b.rows) <= batch_size
        assert all(r in OLD for r in b.replay)
        assert len(set(b.replay)) == len(b.replay)  # no row twice in a batch while there are enough old rows
    # a last batch short of new rows takes replay rows in proportion to its new ones, not a full share
    last = plan[-1]
    if ratio and len(last.new) < batch_size:
        assert len(last.replay) <= math.ceil(len(last.new) * ratio / (1 - ratio))


def test_plan_batches_no_replay_without_old_rows_or_with_ratio_zero():
    for old, ratio in (([], 0.5), (OLD, 0.0)):
        plan = plan_batches(NEW, old, 8, ratio, random.Random(0))
        assert all(not b.replay for b in plan)
        assert [len(b.new) for b in plan] == [8] * 6 + [2]  # full batches of new rows only
    assert plan_batches([], OLD, 8, 0.5, random.Random(0)) == []  # nothing new: nothing to train


@pytest.mark.parametrize("ratio", [0.25, 0.3])
def test_plan_batches_replay_share_is_the_ratio_on_average(ratio):
    # 8 * 0.3 = 2.4 replay rows per batch: stochastic rounding must still give the ratio on average
    plan = plan_batches(range(8000), range(100), 8, ratio, random.Random(2))
    replay = sum(len(b.replay) for b in plan)
    assert replay / sum(len(b.rows) for b in plan) == pytest.approx(ratio, abs=0.01)


def test_plan_batches_same_seed_same_plan():
    def plan(seed):
        return [(b.new, b.replay) for b in plan_batches(NEW, OLD, 8, 0.3, random.Random(seed))]

    # every DDP worker and every resume plans a range alone: the seed alone must fix the plan
    assert plan("0:1:2") == plan("0:1:2")
    assert plan("0:1:2") != plan("0:1:3")


def test_worker_slice():
    # a batch smaller than the world: every rank still gets a non-empty micro-batch (DDP needs one backward each)
    for rows in (["a"], ["a", "b"]):
        slices = [worker_slice(rows, r, 3) for r in range(3)]
        assert all(slices) and {x for s in slices for x in s} == set(rows)
    # a larger batch: the ranks' slices partition it, sizes within one row of each other
    rows = list(range(11))
    slices = [worker_slice(rows, r, 4) for r in range(4)]
    assert sorted(x for s in slices for x in s) == rows
    assert max(map(len, slices)) - min(map(len, slices)) <= 1


# ------------------------------------------------------------------ a store of teacher shards


@pytest.fixture(scope="module")
def shard_tables(tiny_model_dir):
    """Three shards of tiny-teacher answers (8 distinct prompts each). Query ids are content hashes, so the
    held-out split below is the same on every run."""
    from backpack.teachers.hf import HFTeacher

    teacher = HFTeacher(TeacherConfig(name="tiny", model=tiny_model_dir, batch_size=8))
    tables = {}
    for v in (1, 2, 3):
        qs = [Query(messages=[{"role": "user", "content": f"continual prompt {i}"}],
                    decoding=DecodingParams(max_new_tokens=8, logprobs=4))
              for i in range(ROWS_PER_SHARD * (v - 1), ROWS_PER_SHARD * v)]
        tables[v] = teacher.generate(queries_to_table(qs))
    return tables


def trainable(table) -> int:
    """Rows the trainer may use: answered and not held out."""
    return sum(r["status"] == "ok" and not is_heldout(r["query_id"], HELDOUT) for r in table.to_pylist())


@pytest.mark.integration
def test_store_reader_leaves_out_heldout_and_failed_rows(shard_tables, tmp_path):
    class Session:  # stands in for a WorkerSession: its examples are the rows themselves
        def examples(self, rows):
            return rows

    uri = str(tmp_path / "ds")
    reader = _Examples(uri, HELDOUT, Session())
    assert reader.version() == 0  # the dataset does not exist yet
    store = DatasetStore(uri)
    store.append(shard_tables[1])
    store.append(failed_table(queries_to_table([Query(messages=[{"role": "user", "content": "x"}])]),
                              "tiny", "boom"))
    assert reader.version() == 2
    rows = reader.between(0, 2)
    heldout = [r for r in shard_tables[1].to_pylist() if is_heldout(r["query_id"], HELDOUT)]
    assert heldout, "the split should hold out some rows of the shard, or this test shows nothing"
    assert len(rows) == trainable(shard_tables[1]) and all(v == 1 for v, _, _ in rows)
    assert all(r["status"] == "ok" and not is_heldout(r["query_id"], HELDOUT) for _, r, _ in rows)
    assert reader.between(1, 2) == []  # version 2 holds only a failed row
    assert reader.between(2, 2) == []


# ------------------------------------------------------------------ the continual run on Ray


class Background(threading.Thread):
    """run_continual_training blocks until the stop flag: run it beside the test, keep its result or error.
    A daemon, so a run that never ends cannot keep the test process alive."""

    def __init__(self, **kwargs):
        super().__init__(daemon=True)
        self.kwargs, self.result, self.error = kwargs, None, None

    def run(self):
        try:
            self.result = run_continual_training(**self.kwargs)
        except BaseException as e:  # reported by finish()
            self.error = e

    def finish(self, stop, timeout: float = WAIT_S):
        """Set the stop flag and wait for the run's result."""
        stop()
        self.join(timeout)
        assert not self.is_alive(), f"the continual run did not end within {timeout} s of the stop flag"
        if self.error is not None:
            raise self.error
        return self.result


def freshness(metrics_file: Path) -> list[dict]:
    path = freshness_path(metrics_file)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written right now
            pass
    return out


def kept(lines: list[dict]) -> list[dict]:
    """The line of each step the model kept: after a restart, re-made steps are logged again."""
    return list({line["step"]: line for line in lines}.values())


def wait_for(what: str, condition, run: Background, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if not run.is_alive():
            raise AssertionError(f"the continual run ended before {what}: {run.error!r}")
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.5)


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_continual_run_follows_the_store_publishes_stops_and_resumes_after_a_crash(
        ray_session, redis_server, shard_tables, tiny_model_dir, tmp_path):
    from backpack.runtime.redis_server import RunKeys, connect
    from backpack.student.registry import Registry

    run = "cont"
    client = connect(redis_server.url)
    stop_key = RunKeys(run).stop
    registry = Registry(redis_server.url, run, tmp_path / "run")
    store = DatasetStore(tmp_path / "ds")
    store.append(shard_tables[1])
    n1, n2, n3 = (trainable(shard_tables[v]) for v in (1, 2, 3))
    assert min(n1, n2, n3) >= 3 and n1 + n2 + n3 < 3 * ROWS_PER_SHARD  # some rows are held out

    student = StudentConfig(base=tiny_model_dir, mode="full")
    training = TrainingConfig(num_workers=1, cpus_per_worker=0.5, batch_size=2, log_every=1, lr=1e-3,
                              kd_weight=0.5, top_k=4, max_failures=1)
    # replay 0.5 of 2-row batches: every batch after the first version is 1 new + 1 replayed row (no chance)
    continual = ContinualConfig(replay_ratio=0.5, poll_seconds=0.5, publish_every_steps=3)
    common = dict(store_uri=store.uri, student=student, training=training, continual=continual,
                  storage=tmp_path / "train", name="cont", redis_url=redis_server.url, run=run,
                  heldout_fraction=HELDOUT, registry=registry)

    # ---- run 1: version 1 at start, version 2 lands while it runs
    metrics1 = tmp_path / "run1" / "metrics.jsonl"
    metrics1.parent.mkdir()
    first = Background(**common, metrics_file=str(metrics1))
    first.start()
    try:
        # only once version 1 is trained to the end is version 2 appended: it then is a range of its own,
        # trained with replay from version 1 (appended earlier, both would be one range with nothing to replay)
        wait_for("version 1 to be trained", lambda: any(x["dataset_version"] == 1 for x in freshness(metrics1)),
                 first)
        store.append(shard_tables[2])
        # the whole of version 2 (a stop mid-range would checkpoint it as partial)
        wait_for("version 2 to be trained", lambda: any(x["dataset_version"] == 2 for x in freshness(metrics1)),
                 first)
    finally:
        res1 = first.finish(lambda: client.set(stop_key, "1"))

    lines = kept(freshness(metrics1))
    v1 = [x for x in lines if x["new_versions"] == [1]]
    v2 = [x for x in lines if x["new_versions"] == [2]]
    assert len(v1) + len(v2) == len(lines)  # each step trained on one version's rows
    # every trainable row once, so no held-out row: 2 new rows a step in version 1, 1 new + 1 replay after
    assert sum(x["new_rows"] for x in v1) == n1 and all(x["replay_rows"] == 0 for x in v1)
    assert sum(x["new_rows"] for x in v2) == n2
    assert all(x["new_rows"] == 1 and x["replay_rows"] == 1 for x in v2)
    assert [x["step"] for x in lines] == list(range(1, len(lines) + 1))
    assert res1.step == math.ceil(n1 / 2) + n2 == lines[-1]["step"]
    state1 = json.loads((Path(res1.checkpoint) / "state.json").read_text())
    assert state1["step"] == res1.step and state1["dataset_version"] == 2 and state1["partial"] is None
    versions = registry.versions()
    assert len(versions) >= res1.step // 3  # a version every 3 steps (and a last one at the stop)
    steps = [v["step"] for v in versions]
    assert steps == sorted(set(steps)) and steps[-1] == res1.step
    assert versions[-1]["dataset_version"] == 2 and Path(versions[-1]["path"], "version.json").exists()
    published1 = len(versions)

    # ---- run 2: resumed from run 1's checkpoint, version 3 waiting, a worker crash two steps in
    client.delete(stop_key)
    store.append(shard_tables[3])
    metrics2 = tmp_path / "run2" / "metrics.jsonl"
    metrics2.parent.mkdir()
    marker = tmp_path / "crashed-once"
    second = Background(**common,
                        metrics_file=str(metrics2), resume_from=res1.checkpoint,
                        test_hooks={"fail_once_at_step": res1.step + 2, "fail_once_at_step_marker": str(marker)})
    second.start()
    try:
        wait_for("the crash and version 3 trained after it",
                 lambda: marker.exists() and any(x["dataset_version"] == 3 for x in freshness(metrics2)), second)
    finally:
        res2 = second.finish(lambda: client.set(stop_key, "1"))

    assert marker.exists(), "the test hook did not crash a worker"
    raw = freshness(metrics2)
    assert not any({1, 2} & set(x["new_versions"]) for x in raw)  # versions 1-2 were not trained again
    assert Counter(x["step"] for x in raw)[res1.step + 1] == 2  # the step before the crash was made again
    lines = kept(raw)
    assert all(x["new_versions"] == [3] and x["new_rows"] == 1 and x["replay_rows"] == 1 for x in lines)
    assert sum(x["new_rows"] for x in lines) == n3
    assert [x["step"] for x in lines] == list(range(res1.step + 1, res2.step + 1))
    assert res2.step == res1.step + n3 > res1.step
    state2 = json.loads((Path(res2.checkpoint) / "state.json").read_text())
    assert state2["step"] == res2.step and state2["dataset_version"] == 3 and state2["partial"] is None
    versions = registry.versions()
    assert len(versions) > published1 and versions[-1]["step"] == res2.step
    assert versions[-1]["dataset_version"] == 3


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_continual_on_policy_steps_score_the_students_samples_of_the_intakes_prompts(
        ray_session, redis_server, shard_tables, tiny_model_dir, tmp_path):
    """training.objective on_policy in the continual trainer: the rows the intake's prompts were answered in are
    sampled by the student, scored by a real teacher actor through a scheduler, and trained on."""
    from backpack.run.actors import spawn_scheduler
    from backpack.run.pool import TeacherPool
    from backpack.runtime.redis_server import RunKeys, connect

    store = DatasetStore(tmp_path / "ds")
    store.append(shard_tables[1])
    scored = DatasetStore(tmp_path / "on_policy")
    pool = TeacherPool([TeacherConfig(name="tiny", model=tiny_model_dir, replicas=1, batch_size=4, threads=1,
                                      num_cpus=0.5)])
    try:
        pool.start()
        training = TrainingConfig(num_workers=1, cpus_per_worker=0.5, batch_size=2, log_every=1, lr=1e-3, top_k=4,
                                  objective="on_policy", on_policy={"max_new_tokens": 5})
        metrics = tmp_path / "metrics.jsonl"
        run = Background(store_uri=store.uri, student=StudentConfig(base=tiny_model_dir, mode="full"),
                         training=training, continual=ContinualConfig(poll_seconds=0.5, publish_every_steps=100),
                         storage=tmp_path / "train", name="cop", redis_url=redis_server.url, run="cop",
                         heldout_fraction=HELDOUT, metrics_file=str(metrics),
                         on_policy={"schedulers": [spawn_scheduler(pool.replicas, scored, None, flush_rows=2)],
                                    "store": str(tmp_path / "on_policy")})
        run.start()
        try:
            wait_for("version 1 to be trained", lambda: any(x["dataset_version"] == 1 for x in freshness(metrics)),
                     run)
        finally:
            res = run.finish(lambda: connect(redis_server.url).set(RunKeys("cop").stop, "1"))
    finally:
        pool.shutdown()
    n1 = trainable(shard_tables[1])
    assert res.step == math.ceil(n1 / 2)
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert last["on_policy_batches"] == res.step and last["off_policy_batches"] == 0
    assert last["scored_samples"] >= n1 and last["scored_tokens"] > 0
    rows = scored.read().to_pylist()
    prompts = {r["messages"][-1]["content"] for r in shard_tables[1].to_pylist()}
    assert rows and all(r["score_ids"] and r["messages"][-1]["content"] in prompts for r in rows)
