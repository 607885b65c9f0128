"""Scale-out of generation: teacher throughput with 1, 2 and 4 replicas on a local multi-node Ray cluster.

    .venv/bin/python benchmarks/scaling.py [--prompts 48] [--max-new-tokens 32] [--replicas 1,2,4]

Starts its own cluster (backpack/runtime/local_cluster.py): a head and four worker nodes with one logical CPU
and `teacher: 1` each, and a standalone Redis (EmbeddedRedis, the runs' redis.url). Four teacher nodes of one
slot each, rather than two of two, so that the resources alone place R replicas on R different nodes, as on a
real cluster with one teacher per GPU node (on teacher=2 nodes Ray's default scheduler may pack two replicas on
one node, unless `placement: strict_spread`). For each replica count it runs `backpack.run.generate.generate` on
examples/quickstart.yaml (the default teacher SmolLM2-135M-Instruct, 1 torch thread per replica,
`teachers.0.resources: {teacher: 1}`, storage.shared: all nodes are this machine), joining the cluster with
`ray.address`, on the same prompts, under a fresh run name each time (nothing is reused).

Prints generated tokens/s (model loading excluded: the run's generate_seconds, first batch sent to last answer
stored), the speed-up over the 1-replica run of this same invocation next to the ideal R x and next to what
this machine can give at most, min(R, cores) x: replicas on one machine share its cores, so on 2 cores 4
replicas can at best double the throughput of one.

Per-prompt overhead: (R x generate wall time - teacher busy time) / prompts, in ms, where busy time is the sum of
the `latency_s` of each batch (the time inside model.generate; every completion of a batch carries it). It is
the replica time not spent generating: Ray calls, the scheduler, Arrow and Parquet, tokenising and top-k
logprob extraction in the teacher, and replicas idle at the start and the end of the run. Measured in the same
runs rather than with a trivial model and max_new_tokens=1, because what matters is the cost the real path adds
to real batches (with 2 batches in flight per replica, Ray and the scheduler overlap generation and cost little);
the 1-replica figure is the cleanest (no idle tail, no CPU sharing between replicas).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def busy_seconds(dataset_dir: Path) -> float:
    """Seconds the teachers spent in model.generate: each batch's latency once (its rows all carry it)."""
    from backpack.data.store import DatasetStore

    t = DatasetStore(str(dataset_dir)).read(columns=["replica", "latency_s", "finish_reason"])
    batches = {(r, lat) for r, lat, f in zip(*(t.column(c).to_pylist() for c in t.column_names)) if f != "error"}
    return sum(lat for _, lat in batches)


def run_once(args, replicas: int, address: str, redis_url: str, storage: Path):
    from backpack.config import load_config
    from backpack.run.generate import generate

    name = f"scale-r{replicas}-{uuid.uuid4().hex[:8]}"
    cfg = load_config(REPO / "examples" / "quickstart.yaml", [
        f"name={name}", f"storage.path={storage}", "storage.shared=true",  # all nodes are this machine
        f"redis.url={redis_url}", f"ray.address={address}",
        f"prompts.path={REPO / 'examples' / 'prompts.jsonl'}", f"prompts.limit={args.prompts}",
        f"decoding.max_new_tokens={args.max_new_tokens}", f"teachers.0.replicas={replicas}",
        "teachers.0.threads=1", "teachers.0.num_cpus=1", "teachers.0.resources={teacher: 1}"])
    result = generate(cfg)
    if result.failed_rows or result.ok_rows != args.prompts:
        raise SystemExit(f"run {name}: {result.ok_rows} answered, {result.failed_rows} failed of {args.prompts}")
    return result, busy_seconds(cfg.dataset_dir)


def other_raylets(ours: int) -> int:
    """Raylets on this machine beyond our cluster's `ours` (one per node): another Ray (a test run) sharing the
    cores."""
    return len(subprocess.run(["pgrep", "-x", "raylet"], capture_output=True, text=True).stdout.split()) - ours


def _interrupt(*_):
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--replicas", default="1,2,4", help="replica counts to measure, the first is the baseline")
    args = ap.parse_args()
    counts = [int(x) for x in args.replicas.split(",")]

    from backpack.runtime.local_cluster import LocalCluster
    from backpack.runtime.redis_server import EmbeddedRedis

    # SIGTERM takes the same way out as Ctrl-C (the finally below: cluster and Redis stopped, folder removed);
    # once a run has called ray.init, Ray's own handler (sys.exit) unwinds through the same finally.
    signal.signal(signal.SIGTERM, _interrupt)
    cluster = LocalCluster([{"teacher": 1}] * max(counts), cpus_per_node=1, head_cpus=1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    redis = EmbeddedRedis(tmp / "redis")
    cores = os.cpu_count() or 1
    try:
        print(f"{args.prompts} prompts, max_new_tokens={args.max_new_tokens}, SmolLM2-135M-Instruct, 1 thread per "
              f"replica; machine: {cores} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
        t0 = time.perf_counter()
        cluster.start()
        redis.start()
        for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):  # the driver joins with the nodes' auth and token
            if name in cluster.env:
                os.environ[name] = cluster.env[name]
        # else Ray's C++ failure-signal handler in the driver answers SIGTERM with abort(), skipping the clean-up
        os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] = "1"
        nodes = len(cluster.all_nodes)
        others = other_raylets(nodes)
        print(f"cluster up in {time.perf_counter() - t0:.0f} s: head + {len(cluster.workers)} teacher nodes "
              f"({cluster.address}); other Ray raylets on this machine: {others}", flush=True)
        rows = []
        for r in counts:
            print(f"  {r} replica(s)...", flush=True)
            result, busy = run_once(args, r, cluster.address, redis.url, tmp / "runs")
            wall = result.generate_seconds
            rows.append((r, result.tokens, wall, result.tokens_per_s, busy, (r * wall - busy) / args.prompts * 1e3))
            print(f"    {result.tokens} tokens in {wall:.1f} s ({result.tokens_per_s:.1f} tok/s), run "
                  f"{result.seconds:.0f} s with loading; load average {os.getloadavg()[0]:.1f}", flush=True)
            others = max(others, other_raylets(nodes))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        left = cluster.stop()
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        if left:
            print(f"warning: cluster processes {left} did not exit", file=sys.stderr)

    base = rows[0][3]
    print(f"\n{'replicas':>8} {'nodes':>5} {'tokens':>6} {'gen s':>6} {'tok/s':>6} {'speed-up':>8} {'ideal':>6} "
          f"{'ceiling':>7} {'busy s':>7} {'overhead ms/prompt':>18}")
    for r, tok, wall, rate, busy, over in rows:
        print(f"{r:8d} {r:5d} {tok:6d} {wall:6.1f} {rate:6.1f} {rate / base:7.2f}x {r / rows[0][0]:5.1f}x "
              f"{min(r, cores) / min(rows[0][0], cores):6.1f}x {busy:7.1f} {over:18.1f}")
    print(f"\nideal = replicas / baseline replicas; ceiling = what {cores} cores allow (min(replicas, cores)): "
          f"replicas beyond {cores} share the cores, so only a cluster of separate machines can reach the ideal.")
    print(f"per-prompt overhead (1-replica run, no CPU sharing): {rows[0][5]:.1f} ms/prompt outside model.generate")
    if others:
        print(f"note: {others} other Ray raylet(s) ran on this machine meanwhile (another test run): the numbers "
              f"shared the cores with it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
