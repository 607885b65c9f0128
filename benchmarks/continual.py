"""The continual loop on this machine: freshness, ingest throughput, checkpoint-to-served time, swap failures.

    .venv/bin/python benchmarks/continual.py [--config examples/continual.yaml] [--prompts 64] [--minutes 8]

Runs `examples/continual.yaml` (the default teacher SmolLM2-135M-Instruct, the every-other-layer student) as
`backpack run --continual` does, in this process, with its storage in a temporary folder; pushes `--prompts`
prompts to its intake while a client asks the StudentServer questions without pause. Prints:

- freshness: per shard, seconds from the shard being stored (its manifest time) to the end of the first
  optimizer step that trained on its rows; the median is the number. Goal: under 30 s.
- ingest throughput: answers stored per second and teacher tokens per second while the backlog drained,
  as a ratio to the same teacher generating the same kind of prompts alone, in-process, measured first in this
  run (the continual loop shares the CPUs with the trainer and the server, so this ratio says what the
  loop costs the teacher).
- checkpoint to served: per promoted version, seconds from its publication to the server's /health first
  reporting it (the gate's evaluation included).
- swaps: requests answered / failed while versions were swapped in. Goal: none failed.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def baseline_tok_s(cfg, n: int = 16) -> float:
    """Tokens/s of one replica of the run's teacher, alone in this process, on prompts like the pushed ones."""
    import torch

    from backpack.core.schema import queries_to_table
    from backpack.data.prompts import read_prompts
    from backpack.teachers.hf import HFTeacher

    t = cfg.teachers[0]
    torch.set_num_threads(t.threads)
    qs, _ = read_prompts(REPO / "examples" / "prompts.jsonl", cfg.decoding.params(), limit=200)
    teacher = HFTeacher(t)
    teacher.generate(queries_to_table(qs[-t.batch_size:]))  # warm-up
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, n, t.batch_size):
        out = teacher.generate(queries_to_table(qs[100 + i: 100 + i + t.batch_size]))
        tokens += sum(out.column("completion_tokens").to_pylist())
    return tokens / (time.perf_counter() - t0)


class Watcher:
    """Asks the server chat questions one after another, and polls /health for the version it serves."""

    def __init__(self, url: str):
        self.url, self.ok, self.failed, self.first_seen = url, 0, [], {}
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._ask, self._health)]
        for t in self.threads:
            t.start()

    def _ask(self):
        body = json.dumps({"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8}).encode()
        while not self._stop.is_set():
            req = urllib.request.Request(self.url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=300) as r:
                    json.loads(r.read())
                    self.ok += 1
            except Exception as e:  # noqa: BLE001 - every failure is counted
                self.failed.append(repr(e)[:200])

    def _health(self):
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=30) as r:
                    v = json.loads(r.read())["version"]
                    self.first_seen.setdefault(v, time.time())
            except Exception:  # noqa: BLE001 - a busy moment; asked again
                pass
            time.sleep(0.2)

    def stop(self):
        self._stop.set()
        for t in self.threads:
            t.join(320)


def _unix(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "examples" / "continual.yaml"))
    ap.add_argument("--prompts", type=int, default=64, help="prompts pushed after the run is ready")
    ap.add_argument("--minutes", type=float, default=8.0, help="give up after this long")
    args = ap.parse_args()

    from backpack.config import load_config
    from backpack.data.prompts import read_prompts
    from backpack.data.store import DatasetStore
    from backpack.run.continual import ContinualRun
    from backpack.scheduling.intake import Intake, backlog
    from backpack.student.continual import freshness_path
    from backpack.student.registry import Registry

    tmp = tempfile.mkdtemp(prefix="bench-continual-")
    atexit.register(shutil.rmtree, tmp, True)  # the run's checkpoints take gigabytes
    cfg = load_config(args.config, [f"storage.path={tmp}", "serve.port=0"])
    print(f"baseline: one teacher replica alone ({cfg.teachers[0].threads} thread(s), batch "
          f"{cfg.teachers[0].batch_size})...", flush=True)
    base = baseline_tok_s(cfg)
    print(f"  {base:.1f} tok/s", flush=True)

    ready: dict = {}
    stages: list[str] = []
    rep = type("Rep", (), {"stage": lambda _, t: (stages.append(t), print(f"  [run] {t}", flush=True)),
                           "progress": lambda *a: None})()
    run = ContinualRun(cfg, rep, on_ready=ready.update)
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _guard(run.run, errors), daemon=True)
    thread.start()
    deadline = time.monotonic() + args.minutes * 60
    while not ready and not errors and time.monotonic() < deadline:
        time.sleep(0.5)
    if not ready:
        print(f"the run did not start: {errors or 'timeout'}")
        return 1
    url = ready["redis_url"]
    watcher = Watcher(ready["server_url"])
    queries, _ = read_prompts(REPO / "examples" / "prompts.jsonl", cfg.decoding.params(),
                              cfg.prompts.default_task, limit=cfg.prompts.limit + args.prompts)
    queries = queries[cfg.prompts.limit or 0:]
    seeded = backlog(url, cfg.name)
    t_push = time.time()
    accepted, _ = Intake(url, cfg.name).push_many(queries)
    print(f"pushed {accepted} prompt(s) ({seeded.pushed} seed prompt(s) before)", flush=True)
    fresh = freshness_path(cfg.run_dir / "train" / "metrics.jsonl")
    registry = Registry(url, cfg.name, cfg.run_dir)
    store = DatasetStore(str(cfg.dataset_dir))
    drained_at = None
    while time.monotonic() < deadline and not errors:
        b = backlog(url, cfg.name)
        if drained_at is None and b.waiting == 0 and b.in_progress == 0 and b.answered + b.failed >= b.pushed:
            drained_at = time.time()
            print(f"backlog drained after {drained_at - t_push:.0f} s", flush=True)
        if drained_at is not None and _trained_upto(fresh) >= store.version and _served_latest(registry, watcher):
            break
        time.sleep(2)
    watcher.stop()
    versions = registry.versions()  # before the stop: the embedded Redis goes with the run
    run.stop()
    thread.join(900)

    shards = {e.version: _unix(e.created_at) for e in DatasetStore(str(cfg.dataset_dir), create=False)
              .manifest().shards}
    first_step = {}
    for line in fresh.read_text().splitlines() if fresh.exists() else []:
        rec = json.loads(line)
        for v in rec["new_versions"]:
            first_step.setdefault(v, rec["time"])
    lags = [first_step[v] - shards[v] for v in sorted(shards) if v in first_step]
    new_shards = [e for e in DatasetStore(str(cfg.dataset_dir), create=False).manifest().shards
                  if _unix(e.created_at) >= t_push]
    answered = sum(e.ok for e in new_shards)
    table = DatasetStore(str(cfg.dataset_dir), create=False).read(columns=["created_at", "completion_tokens"])
    span = ((drained_at or time.time()) - t_push) or 1.0
    tokens = sum(t for t, c in zip(table.column("completion_tokens").to_pylist(),
                                   table.column("created_at").to_pylist()) if c and c.timestamp() >= t_push)
    served = []
    for m in versions:
        if m["version"] in watcher.first_seen:
            served.append((m["version"], watcher.first_seen[m["version"]] - m["created_at"]))

    print("\n== continual loop ==")
    if lags:
        print(f"freshness: median {statistics.median(lags):.1f} s over {len(lags)} shard(s) "
              f"(min {min(lags):.1f}, max {max(lags):.1f}); goal < 30 s: "
              f"{'met' if statistics.median(lags) < 30 else 'NOT met'} (ratio to goal {statistics.median(lags) / 30:.2f})")
    else:
        print("freshness: no shard was trained on")
    print(f"ingest: {answered} answer(s) in {span:.0f} s = {answered / span:.2f} answers/s, {tokens / span:.1f} tok/s; "
          f"{tokens / span / base:.2f}x the teacher alone ({base:.1f} tok/s)" + ("" if drained_at else
                                                                                   " (backlog NOT drained)"))
    if served:
        lag = [s for _, s in served]
        print(f"checkpoint -> served: median {statistics.median(lag):.1f} s over {len(lag)} promoted version(s) "
              f"(versions {[v for v, _ in served]}; includes the gate's evaluation)")
    else:
        print("checkpoint -> served: no version was promoted")
    print(f"server during swaps: {watcher.ok} request(s) answered, {len(watcher.failed)} failed; goal 0 failed: "
          f"{'met' if not watcher.failed else 'NOT met ' + str(watcher.failed[:3])}")
    if errors:
        print(f"the run failed: {errors[0]}")
        return 1
    return 0


def _guard(fn, errors):
    try:
        fn()
    except BaseException as e:  # reported by main
        errors.append(e)


def _trained_upto(fresh: Path) -> int:
    if not fresh.exists():
        return 0
    lines = fresh.read_text().splitlines()
    return json.loads(lines[-1])["dataset_version"] if lines else 0


def _served_latest(registry, watcher) -> bool:
    latest = registry.latest()
    return latest is not None and (latest["version"] in watcher.first_seen or (latest.get("gate") or {}).get(
        "decision") == "kept")


if __name__ == "__main__":
    sys.exit(main())
