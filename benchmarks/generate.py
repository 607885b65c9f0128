"""Teacher throughput through the full actor path versus one in-process batched generate loop.

    .venv/bin/python benchmarks/generate.py [--prompts 48] [--max-new-tokens 64] [--batch-size 8]

Same prompts, same model (the default SmolLM2-135M-Instruct), same machine, same total torch threads:
  baseline   HFTeacher in this process, `threads` torch threads, batches of --batch-size, one after another
  actor 1xT  the scheduler actor + one teacher actor with T threads (isolates the cost of the actor path)
  actor RxT' the scheduler actor + R replicas sharing the same T threads (the quickstart's shape)
Prints generated tokens/s of each and its ratio to the baseline, and the peak RSS of each teacher replica.
Goal: the actor path loses under 10% versus the in-process loop at the same total threads (ratio >= 0.90).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent


def load_queries(n: int, max_new_tokens: int):
    from backpack.core.types import DecodingParams
    from backpack.data.prompts import read_prompts

    queries, _ = read_prompts(REPO / "examples" / "prompts.jsonl", DecodingParams(max_new_tokens=max_new_tokens))
    return queries[:n]


def baseline(queries, threads: int, batch_size: int) -> tuple[float, int, int]:
    """(seconds, tokens, peak rss bytes) of the in-process loop."""
    import resource

    from backpack.config import TeacherConfig
    from backpack.core.schema import queries_to_table
    from backpack.teachers.hf import HFTeacher

    teacher = HFTeacher(TeacherConfig(name="smol", threads=threads, batch_size=batch_size))
    table = queries_to_table(queries)
    teacher.generate(table.slice(0, 1))  # warm-up, as the actors get during `ready`
    t0 = time.perf_counter()
    out = teacher.generate(table)
    seconds = time.perf_counter() - t0
    tokens = sum(out.column("completion_tokens").to_pylist())
    return seconds, tokens, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def actor_path(queries, replicas: int, threads: int, batch_size: int) -> tuple[float, int, list[int]]:
    """(seconds, tokens, peak rss per replica) through TeacherPool + scheduler actor + DatasetStore."""
    import ray

    from backpack.config import TeacherConfig
    from backpack.core.schema import queries_to_table
    from backpack.data.store import DatasetStore
    from backpack.run.actors import spawn_scheduler
    from backpack.run.pool import TeacherPool

    cfg = TeacherConfig(name="smol", replicas=replicas, threads=threads, num_cpus=threads, batch_size=batch_size,
                        max_in_flight=2)
    pool = TeacherPool([cfg])
    try:
        pool.start()
        table = queries_to_table(queries)
        ray.get([r.actor.generate.remote(table.slice(0, 1)) for r in pool.replicas])  # warm-up
        with tempfile.TemporaryDirectory() as tmp:
            store = DatasetStore(Path(tmp) / "ds")
            sched = spawn_scheduler(pool.replicas, store, None, policy="least_loaded", flush_rows=64)
            t0 = time.perf_counter()
            summary = ray.get(sched.run.remote(table))
            seconds = time.perf_counter() - t0
            ray.kill(sched)
        peaks = ray.get([r.actor.peak_memory.remote() for r in pool.replicas])
        return seconds, summary["tokens"], peaks
    finally:
        pool.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="total torch threads (default: cores)")
    ap.add_argument("--replicas", type=int, default=2)
    args = ap.parse_args()

    import ray

    queries = load_queries(args.prompts, args.max_new_tokens)
    print(f"{len(queries)} prompts, max_new_tokens={args.max_new_tokens}, batch_size={args.batch_size}, "
          f"{args.threads} threads in all", flush=True)
    # Ray first, so its background processes (GCS, raylet) load the machine in every measurement alike.
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    b_s, b_tok, b_rss = baseline(queries, args.threads, args.batch_size)
    b_rate = b_tok / b_s
    rows = [("in-process loop (baseline)", f"1x{args.threads}", b_s, b_tok, b_rate, [b_rss])]
    shapes = [(1, args.threads)]
    if args.replicas > 1 and args.threads % args.replicas == 0:
        shapes.append((args.replicas, args.threads // args.replicas))
    for reps, thr in shapes:
        s, tok, peaks = actor_path(queries, reps, thr, args.batch_size)
        rows.append(("actor path (scheduler + pool)", f"{reps}x{thr}", s, tok, tok / s, peaks))
    ray.shutdown()
    print(f"\n{'path':32} {'replicas x threads':>18} {'seconds':>8} {'tokens':>7} {'tok/s':>7} {'ratio':>6}  peak RSS per replica")
    for name, shape, s, tok, rate, peaks in rows:
        mem = ", ".join(f"{p / 2**20:.0f} MiB" for p in peaks)
        print(f"{name:32} {shape:>18} {s:8.1f} {tok:7d} {rate:7.1f} {rate / b_rate:6.2f}  {mem}")
    worst = min(r[4] for r in rows[1:]) / b_rate
    print(f"\ngoal: actor path >= 0.90x the in-process loop; worst shape measured {worst:.2f}x -> "
          f"{'met' if worst >= 0.9 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
