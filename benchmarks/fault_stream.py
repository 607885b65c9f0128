"""The stream part of benchmarks/faults.py: a continual run fed a stream of prompts while its parts are killed.

The run is `backpack run CONFIG --continual` in a child process (so it can be SIGKILLed and started again, as
a user would), on a Redis this script owns (so it can be paused and restarted) and a local Ray that the driver
starts (and that goes with it). The teacher and the student are a tiny random Llama with the default model's
tokenizer, answers are 8 tokens: the suite is about what is kept, not about what is learned. Faults, in a
shuffled order at random moments while prompts are being pushed:

    teacher     SIGKILL a teacher replica's process          scheduler   SIGKILL the scheduler actor's process
    trainer     SIGKILL a Ray Train worker's process          driver      SIGKILL the driver, start the run again
    pause       SIGSTOP Redis for 40 s, then SIGCONT          redis       stop Redis (SIGTERM) and start it again

After each fault the script waits for the run to answer again before the next. At the end it waits for every
pushed prompt to be stored, stops the run with SIGINT (the Ctrl-C a user would press) and counts by prompt id.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAULTS = ["teacher", "scheduler", "trainer", "driver", "pause", "redis"]
PAUSE_S = 40
PASSWORD_ENV = "FAULTS_REDIS_PASSWORD"


def run_overrides(tmp: Path, model: str, redis_port: int) -> list[str]:
    """examples/continual.yaml, made small: two tiny teacher replicas (one may die while the other answers),
    short answers, a checkpoint every 10 steps so a resume redoes little."""
    (tmp / "seed.jsonl").write_text(json.dumps({"id": "seed-0", "prompt": "Say hello."}) + "\n")
    return [f"storage.path={tmp / 'runs'}", f"redis.url=redis://127.0.0.1:{redis_port}/0",
            f"redis.password_env={PASSWORD_ENV}", "ray.num_cpus=4", f"prompts.path={tmp / 'seed.jsonl'}",
            "prompts.limit=1", f"teachers.0.model={model}", "teachers.0.replicas=2", "teachers.0.num_cpus=0.5",
            "teachers.0.batch_size=8", "teachers.0.prepack_weights=false", "decoding.max_new_tokens=8",
            f"student.base={model}", "training.checkpoint_every=10",
            "training.max_failures=3", "training.max_len=64", "continual.publish_every_steps=10",
            "continual.gate_rows=4", "eval.max_rows=4", "eval.max_new_tokens=8", "serve.port=0",
            "serve.max_new_tokens=8"]


class Driver:
    """The `backpack run --continual` child process; its output goes to one log file across restarts."""

    def __init__(self, config: Path, overrides: list[str], log: Path, env: dict):
        self.argv = [sys.executable, "-m", "backpack.cli", "run", str(config), *overrides, "--continual"]
        self.log, self.env = log, env
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.log, "a") as f:
            f.write(f"\n==== start {self.starts} ====\n")
        out = open(self.log, "a")
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                                     start_new_session=True)
        out.close()

    def sigkill(self, group: bool = False) -> None:
        """SIGKILL the driver process (with `group`: also what it started, its local Ray among them)."""
        if group:
            os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 600) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.sigkill(group=True)
            return -9


def _pids(marker: str) -> list[int]:
    import psutil

    return sorted(p.pid for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or []))


def kill_process(marker: str) -> str:
    pids = _pids(marker)
    if not pids:
        return f"no process with {marker!r}"
    os.kill(pids[0], signal.SIGKILL)
    return f"killed pid {pids[0]} ({marker})"


class Stream:
    """Pushes the prompts in small batches; a push that fails because Redis is away is tried again later (an
    accepted push, or a duplicate answer to the retry of a push whose reply was lost, counts as pushed)."""

    def __init__(self, url: str, run: str, n: int):
        self.url, self.run = url, run
        self.todo = [(f"s{i:05d}", f"Item {i}: what is {i % 97} plus {i % 13}?") for i in range(n)]
        self.pushed: set[str] = set()
        self.push_errors = 0

    def push(self, count: int) -> None:
        from backpack.scheduling.intake import Intake

        try:
            intake = Intake(self.url, self.run, password_env=PASSWORD_ENV)
            while self.todo and count > 0:
                qid, text = self.todo[0]
                intake.push(text, id=qid, task="faults")
                self.pushed.add(qid)
                self.todo.pop(0)
                count -= 1
        except Exception:  # noqa: BLE001 - Redis paused or restarting: the same prompt is pushed again later
            self.push_errors += 1


def answered(url: str, run: str) -> int:
    from backpack.scheduling.intake import backlog

    try:
        b = backlog(url, run, PASSWORD_ENV)
        return b.answered + b.failed
    except Exception:  # noqa: BLE001 - Redis away: not answering yet
        return -1


def drained(url: str, run: str) -> bool:
    from backpack.scheduling.intake import backlog

    try:
        b = backlog(url, run, PASSWORD_ENV)
    except Exception:  # noqa: BLE001 - Redis away
        return False
    return b.waiting == 0 and b.in_progress == 0 and b.answered + b.failed >= b.pushed


def steps_redone(metrics: Path) -> list[int]:
    """Per resume of the trainer, how many steps it did again (the steps past its checkpoint it had done)."""
    redone, top, last = [], 0, 0
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        step = json.loads(line)["step"]
        if step <= last:  # a step number again: the trainer started over from a checkpoint
            redone.append(top - step + 1)
        top, last = max(top, step), step
    return redone


def count_rows(dataset: Path, pushed: set[str]) -> dict:
    from backpack.data.store import DatasetStore

    table = DatasetStore(str(dataset), create=False).read(columns=["query_id", "status", "error"])
    ids, status, error = (table.column(c).to_pylist() for c in ("query_id", "status", "error"))
    rows = Counter(ids)
    return {"pushed": len(pushed),
            "answered": len({q for q, s in zip(ids, status) if s == "ok" and q in pushed}),
            "failed with reason": len({q for q, s, e in zip(ids, status, error) if s != "ok" and e and q in pushed}),
            "failed without reason": sum(1 for s, e in zip(status, error) if s != "ok" and not (e or "").strip()),
            "lost": len(pushed - set(ids)),
            "duplicated": sum(c - 1 for c in rows.values() if c > 1),
            "rows": len(ids)}


def run_stream(n: int, seed: int, minutes: float, rounds: int = 2) -> dict:
    """Run the stream with `rounds` rounds of the six faults (each round in its own order); returns the counts, the faults' log and the tracebacks seen."""
    import tempfile

    from backpack.runtime.redis_server import EmbeddedRedis

    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    from backpack.teachers.loader import save_tiny_llama

    model = save_tiny_llama(tmp / "tiny")
    redis = EmbeddedRedis(tmp / "redis").start()
    env = {**os.environ, PASSWORD_ENV: redis.password, "HF_HUB_OFFLINE": "1"}
    os.environ[PASSWORD_ENV] = redis.password
    url = f"redis://127.0.0.1:{redis.port}/0"
    overrides = run_overrides(tmp, model, redis.port)
    driver = Driver(REPO / "examples" / "continual.yaml", overrides, tmp / "driver.log", env)
    stream = Stream(url, "continual", n)
    events: list[str] = []
    recoveries: list[tuple[str, float | None]] = []  # (fault, seconds until answers were stored again)
    t_fault = time.monotonic()
    deadline = time.monotonic() + minutes * 60
    t0 = time.monotonic()

    def note(text: str) -> None:
        events.append(f"{time.monotonic() - t0:6.0f} s  {text}")
        print(f"  {events[-1]}", flush=True)

    def pump(seconds: float, per_tick: int = 12) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            stream.push(per_tick)
            if driver.proc.poll() is not None:
                raise RuntimeError(f"the run ended by itself (status {driver.proc.returncode}); see {driver.log}")
            time.sleep(1.0)

    def recovered(what: str, timeout: float = 300) -> None:
        """Wait until the run stores answers again (the count of stored answers grows, or all are stored)."""
        end, before = time.monotonic() + timeout, -1
        while time.monotonic() < end:
            pump(2, per_tick=2)
            now = answered(url, "continual")
            if before >= 0 and (now > before or (not stream.todo and drained(url, "continual"))):
                note(f"answering again after {what} ({now} stored)")
                recoveries.append((what, time.monotonic() - t_fault))
                return
            before = now if before < 0 else before
        note(f"NOT answering {timeout:.0f} s after {what}")
        recoveries.append((what, None))

    driver.start()
    note("driver started")
    recovered("start", timeout=600)
    faults = []
    for _ in range(rounds):
        faults += rng.sample(FAULTS, len(FAULTS))
    recoveries.clear()
    for i, fault in enumerate(faults):
        gap = rng.uniform(5, 30)
        # most prompts go in before the faults run out, while some are kept to see each recovery by
        pump(gap, per_tick=max(1, int(len(stream.todo) * 0.7 / (len(faults) - i) / gap)))
        t_fault = time.monotonic()
        if fault == "teacher":
            note(kill_process("ray::TeacherHost"))
        elif fault == "scheduler":
            note(kill_process("ray::Scheduler"))
        elif fault == "trainer":
            note(kill_process("RayTrainWorker"))
        elif fault == "driver":
            driver.sigkill()
            note("SIGKILLed the driver; starting it again")
            time.sleep(2)
            driver.start()
        elif fault == "pause":
            os.kill(redis.proc.pid, signal.SIGSTOP)
            note(f"paused Redis for {PAUSE_S} s")
            pump(PAUSE_S)  # the application goes on pushing: its pushes fail and are tried again
            os.kill(redis.proc.pid, signal.SIGCONT)
            t_fault = time.monotonic()  # the recovery counts from the end of the pause
            note("Redis goes on")
        elif fault == "redis":
            port = redis.port
            redis.stop()
            note("stopped Redis")
            time.sleep(3)
            redis = EmbeddedRedis(tmp / "redis", port=port, password=redis.password).start()
            note("started Redis again on its AOF")
        recovered(fault)
    while stream.todo and time.monotonic() < deadline:
        pump(5, per_tick=50)
    note(f"all {len(stream.pushed)} prompt(s) pushed; waiting for them to be stored")
    while time.monotonic() < deadline and not drained(url, "continual"):
        pump(5)
    note(f"{answered(url, 'continual')} stored; stopping the run (SIGINT)")
    code = driver.stop()
    note(f"the run exited with status {code}")
    redis.stop()
    counts = count_rows(tmp / "runs" / "continual" / "dataset", stream.pushed)
    log = (tmp / "driver.log").read_text(errors="replace")
    from backpack.student.continual import freshness_path

    redone = steps_redone(freshness_path(tmp / "runs" / "continual" / "train" / "metrics.jsonl"))
    if counts["lost"] or counts["duplicated"] or counts["failed without reason"]:
        print(f"  kept for a look: {tmp} (driver.log, runs/continual)")
    else:
        shutil.rmtree(tmp, ignore_errors=True)  # checkpoints: hundreds of MB
    return {"counts": counts, "events": events, "tracebacks": log.count("Traceback (most recent call last)"),
            "steps_redone": redone,
            "exit": code, "recoveries": recoveries, "push_errors": stream.push_errors}


def print_stream(result: dict) -> None:
    c = result["counts"]
    print(f"\n{'fault':10} {'times':>5} {'answering again after (s)':>26}")
    for fault in FAULTS:
        took = [t for f, t in result["recoveries"] if f == fault]
        shown = ", ".join("never" if t is None else f"{t:.0f}" for t in took)
        print(f"{fault:10} {len(took):5} {shown:>26}")
    print(f"\n{'prompts pushed':22} {c['pushed']:7}")
    for key in ("answered", "failed with reason", "failed without reason", "lost", "duplicated"):
        print(f"{key:22} {c[key]:7}")
    print(f"{'rows in the dataset':22} {c['rows']:7}   (with the run's one seed prompt)")
    print(f"{'steps redone':22} {result['steps_redone']} (per trainer resume)")
    print(f"{'tracebacks in the log':22} {result['tracebacks']:7}   (driver exit status {result['exit']}; "
          f"{result['push_errors']} push attempt(s) met a Redis away and were tried again)")
