"""The continual loop end to end (`backpack run --continual` without the CLI): nothing pushed is lost.

Real parts at small sizes: the session's Ray, a real Redis server, the tiny model as teacher and student. While
prompts are being pushed, a teacher actor, the scheduler actor and a trainer worker process (SIGKILL) are
killed at different moments; every pushed prompt ends up exactly once in the dataset (answered or failed), the trainer resumes from
its last checkpoint, and the server answers every request while versions are swapped in. A stopped run leaves
unread prompts in the stream and the next run answers them, continuing the trainer's step count.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections import Counter

import pytest

from backpack.config import (ContinualConfig, EvalConfig, PromptsConfig, RedisConfig, RunConfig, SchedulerConfig,
                             ServeConfig, StorageConfig, StudentConfig, TeacherConfig, TrainingConfig)
from backpack.data.store import DatasetStore
from backpack.run.continual import ContinualRun
from backpack.runtime.redis_server import RunKeys
from backpack.scheduling.intake import Intake, backlog
from backpack.student.continual import freshness_path
from backpack.student.registry import Registry

pytestmark = pytest.mark.integration


def _config(tmp_path, tiny_model_dir, redis_url) -> RunConfig:
    seed = tmp_path / "seed.jsonl"
    seed.write_text("".join(json.dumps({"prompt": f"seed prompt {i}"}) + "\n" for i in range(4)))
    return RunConfig(
        name="cont", storage=StorageConfig(path=str(tmp_path / "runs")), redis=RedisConfig(url=redis_url),
        teachers=[TeacherConfig(name="tiny", model=tiny_model_dir, batch_size=4, num_cpus=0.5)],
        prompts=PromptsConfig(path=str(seed)),
        decoding={"max_new_tokens": 8, "logprobs": 2},
        scheduler=SchedulerConfig(flush_rows=4, flush_seconds=1.0, max_pending=16),
        student=StudentConfig(base=tiny_model_dir, mode="full"),
        training=TrainingConfig(cpus_per_worker=0.25, batch_size=2, lr=1e-3, kd_weight=0.5, top_k=2, log_every=1,
                                max_failures=1),
        eval=EvalConfig(heldout_fraction=0.25),
        # Every version is promoted (a huge margin), so the server swaps often while it is being asked.
        continual=ContinualConfig(replay_ratio=0.5, poll_seconds=0.5, publish_every_steps=2, promote_margin=1e6,
                                  gate_rows=4),
        serve=ServeConfig(port=0, num_cpus=0.25, max_new_tokens=4))


def _wait(what: str, cond, timeout: float = 300.0, every: float = 0.5, run_thread=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if run_thread is not None and not run_thread.is_alive():
            raise AssertionError(f"the continual run ended while waiting for {what}")
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


class _Running:
    """A ContinualRun in a thread, with what it reported and its errors."""

    def __init__(self, cfg, **kwargs):
        self.ready, self.stages, self.error, self.result = {}, [], None, None
        rep = type("Rep", (), {"stage": lambda _, text: self.stages.append(text),
                               "progress": lambda *a: None})()
        self.run = ContinualRun(cfg, rep, on_ready=self.ready.update, **kwargs)
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        _wait("the run to be ready", lambda: self.ready or self.error, timeout=600)
        assert self.error is None, self.error

    def _main(self):
        try:
            self.result = self.run.run()
        except BaseException as e:  # reported by the test
            self.error = e

    def stop(self):
        self.run.stop()
        self.thread.join(900)
        assert not self.thread.is_alive(), "the run did not stop"
        assert self.error is None, self.error
        return self.result


class _Asker:
    """Asks the server a chat question in a loop (one request at a time) and records every status."""

    def __init__(self, url: str):
        self.url, self.statuses, self.versions, self._stop = url, [], set(), threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        body = json.dumps({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}).encode()
        while not self._stop.is_set():
            req = urllib.request.Request(self.url + "/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as resp:
                    self.statuses.append(resp.status)
                    self.versions.add(json.loads(resp.read())["backpack"]["version"])
            except Exception as e:  # noqa: BLE001 - any failure is what the test counts
                self.statuses.append(repr(e))
            time.sleep(0.05)

    def stop(self):
        self._stop.set()
        self.thread.join(180)


def test_nothing_lost_when_a_teacher_the_scheduler_and_a_trainer_worker_die(
        ray_session, redis_server, tiny_model_dir, tmp_path):
    import ray

    cfg = _config(tmp_path, tiny_model_dir, redis_server.url)
    intake = Intake(redis_server.url, cfg.name, decoding=cfg.decoding.params())
    pushed: list[str] = []

    def push(n: int, tag: str):
        pushed.extend(intake.push(f"{tag} question {i}: what is {i} plus {i}?").query_id for i in range(n))

    store = DatasetStore(str(cfg.dataset_dir))
    fresh = freshness_path(cfg.run_dir / "train" / "metrics.jsonl")

    def stored() -> set:
        return set(store.read(columns=["query_id"]).column("query_id").to_pylist()) if store.version else set()

    def steps() -> list:
        return [json.loads(line)["step"] for line in fresh.read_text().splitlines()] if fresh.exists() else []

    running = _Running(cfg)
    asker = _Asker(running.ready["server_url"])
    try:
        push(8, "first")
        _wait("the first answers", lambda: len(stored()) >= 6, run_thread=running.thread)

        ray.kill(running.run.pool.replicas[0].actor, no_restart=True)   # a teacher dies
        push(8, "second")
        _wait("the teacher to be respawned", lambda: running.run.result.restarts.get("teacher"),
              run_thread=running.thread)

        ray.kill(running.run.scheduler, no_restart=True)                # the scheduler dies
        push(8, "third")
        _wait("the scheduler to be restarted", lambda: running.run.result.restarts.get("scheduler"),
              run_thread=running.thread)

        _wait("a few training steps", lambda: max(steps(), default=0) >= 3, run_thread=running.thread)
        killed_at = max(steps())
        killed = _kill_training_worker()                                 # a trainer worker dies
        _wait("a new training worker", lambda: _training_workers() - {killed}, run_thread=running.thread)
        _wait("every pushed prompt to be stored", lambda: set(pushed) <= stored(), run_thread=running.thread)
        _wait("training to go on after the kill", lambda: max(steps(), default=0) > killed_at + 2,
              run_thread=running.thread)
        registry = Registry(redis_server.url, cfg.name, cfg.run_dir)
        _wait("a promoted version being served", lambda: len(asker.versions - {0}) >= 1, run_thread=running.thread)
    finally:
        asker.stop()
        first = running.stop()

    # every pushed prompt is in the dataset exactly once (answered, or failed with its cause)
    table = store.read(columns=["query_id", "status", "error"])
    counts = Counter(table.column("query_id").to_pylist())
    assert all(counts[q] == 1 for q in pushed), {q: counts[q] for q in pushed if counts[q] != 1}
    assert len(pushed) == 24 and set(pushed) <= set(counts)
    b = backlog(redis_server.url, cfg.name)
    assert (b.waiting, b.in_progress) == (0, 0) and b.answered + b.failed >= 24
    assert first.restarts.get("teacher") and first.restarts.get("scheduler")
    from backpack.run.ops import incidents_of  # the teacher's death is on record for `backpack status`

    assert any(i["what"] == "died: started again" for i in incidents_of(cfg))
    # Ray Train restarted the worker group from the last checkpoint (training.max_failures) and it went on
    # training; the run's trainer task itself did not fail
    assert first.step > killed_at + 2 and not first.restarts.get("trainer")
    # the server answered every request, before, during and after swaps to promoted versions
    assert asker.statuses and all(s == 200 for s in asker.statuses), Counter(map(str, asker.statuses))
    assert registry.live() and len(asker.versions) >= 2
    assert any(m.get("gate") and m["gate"]["decision"] == "promoted" for m in registry.versions())
    assert redis_server.url and not Registry(redis_server.url, cfg.name, cfg.run_dir).client.exists(
        RunKeys(cfg.name).server)  # the stopped server is no longer advertised

    # while no run is live, pushed prompts wait in the stream; the next run answers them and trains on
    push(4, "while stopped")
    assert backlog(redis_server.url, cfg.name).waiting == 4
    second = _Running(cfg)
    try:
        _wait("the prompts pushed while stopped", lambda: set(pushed) <= stored(), run_thread=second.thread)
        _wait("a step on them", lambda: max(steps(), default=0) > first.step, run_thread=second.thread)
    finally:
        again = second.stop()
    assert again.step > first.step
    counts = Counter(store.read(columns=["query_id"]).column("query_id").to_pylist())
    assert all(counts[q] == 1 for q in pushed)
    assert any("seed" in s and "0 pushed" in s for s in second.stages)  # the seed prompts were not pushed twice


def test_cli_continual_run_status_while_live_and_ctrl_c(ray_session, tiny_model_dir, tmp_path):
    """`backpack run --continual` as a user runs it (embedded Redis): `backpack status` finds the live run and
    its server, Ctrl-C stops it cleanly with a summary, and nothing of it is left running."""
    import signal
    import subprocess
    import sys

    import yaml

    from conftest import REPO, run_cli

    cfg = _config(tmp_path, tiny_model_dir, None).model_dump(mode="json")
    cfg["ray"]["address"] = ray_session.get_runtime_context().gcs_address
    cfg["ray"]["namespace"] = "cli-continual"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "backpack.cli", "run", str(path), "--continual"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        endpoint = tmp_path / "runs" / "cont" / "redis" / "endpoint.json"
        _wait("the run to serve", lambda: endpoint.exists() and _status(path).get("server"), timeout=300,
              every=2.0)
        status = _status(path)
        assert status["server"]["url"].startswith("http://127.0.0.1:")
        assert status["backlog"]["pushed"] == 4  # the seed prompts
        ingest = run_cli("ingest", str(path), "-", input="a prompt pushed from stdin\n")
        assert ingest.returncode == 0 and "1 accepted" in ingest.stdout, ingest.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped after" in out and "run the same command again to resume" in out
    assert "Traceback" not in err
    assert not endpoint.exists()  # the embedded Redis is gone with the run


def _training_workers() -> set[int]:
    """PIDs of the Ray Train worker processes."""
    import psutil

    return {p.pid for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])}


def _kill_training_worker() -> int:
    """SIGKILL a Ray Train worker process, as if its node went away; returns its PID."""
    import os
    import signal

    workers = _training_workers()
    assert workers, "no Ray Train worker process found"
    pid = min(workers)
    os.kill(pid, signal.SIGKILL)
    return pid


def _status(path) -> dict:
    from conftest import run_cli

    proc = run_cli("status", str(path), "--json")
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def test_a_trainer_stuck_after_its_last_checkpoint_does_not_hold_the_driver(ray_session, tmp_path, monkeypatch):
    """Ray Train has been seen not to return after the worker wrote the stop's checkpoint: the driver waits a
    grace period once that checkpoint exists, then cancels the task and says where the next run resumes."""
    import ray

    import backpack.run.continual as continual
    from backpack.data.storage import RunFiles

    def stuck():  # defined here: Ray ships it by value (the test module is not importable in its workers)
        time.sleep(3600)

    monkeypatch.setattr(continual, "TRAINER_EXIT_S", 1.0)
    files = RunFiles(tmp_path)
    weights = (2).to_bytes(8, "little") + b"{}"  # an empty safetensors file: a whole checkpoint to resume from
    for name in ("checkpoint_1", "checkpoint_2"):
        files.write_bytes(f"train/old/{name}/trainable.safetensors", weights)
    files.write_text("train/old/checkpoint_1/state.json", json.dumps({"step": 3}))
    said = []
    trainer = ray.remote(num_cpus=0)(stuck).remote()
    before = continual._checkpoints(files)
    files.write_text("train/old/checkpoint_2/state.json", json.dumps({"step": 5}))  # the stop's checkpoint
    t0 = time.monotonic()
    continual.stop_trainer(trainer, files, before, said.append)
    assert time.monotonic() - t0 < 30
    assert said == ["the trainer did not return after writing its last checkpoint; stopped it. The next run "
                    "resumes from step 5"]
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(trainer, timeout=30)
