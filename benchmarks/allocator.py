"""Training speed by memory allocator: the same plain training loop under glibc's malloc and each preloadable one.

    .venv/bin/python benchmarks/allocator.py [--dataset runs/quickstart/dataset] [--steps 8] [--rounds 2]
        [--lib NAME=PATH ...]

The loop is benchmarks/train.py's baseline (the quickstart's student: SmolLM2-135M, every other layer, trained
in full; batch 8 x 256, CE + top-k KD, all cores), run in a fresh process per candidate so that its settings are
in place from the start, as in Backpack's training workers. Candidates: glibc's malloc with one arena (the
baseline: what `training.allocator: system` runs, and what a machine without tcmalloc trained with before),
glibc's defaults, `auto` (glibc keeping its memory: backpack/runtime/allocator.py), tcmalloc where the system
has it, any library named with --lib (e.g. mimalloc or jemalloc from the system's packages, tbbmalloc from the
`tbb` wheel) and any glibc settings named with --env. Each runs `--rounds` times, interleaved, so that a slow
minute of the machine hits all of them; its figure is its best round. Throughput is answer tokens trained per
second after the first (warm-up) step; the ratio is against the baseline, measured in the same run.

The last line: `allocator: auto <x>x glibc malloc`
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

_CHILD = """
import json, os, sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {bench!r})
from train import plain_loop
from backpack.config import StudentConfig, TrainingConfig
maps = open("/proc/self/maps").read()
libs = [os.path.basename(p) for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split()]
loaded = ",".join(lib for lib in libs if lib in maps) or "nothing"
batches = json.load(open({batches!r}))
tc = TrainingConfig(batch_size=len(batches[0]), max_len=256, kd_weight=0.5, top_k=4, lr=3e-4)
rate, _ = plain_loop(batches, StudentConfig(mode="full", layers="every_other"), tc, {steps}, {threads})
import resource
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({{"rate": rate, "loaded": loaded, "rss_gib": rss}}))
"""


def run_once(env_extra: dict, batches_file: str, steps: int, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_ARENA_MAX")}
    env.update(env_extra)
    code = _CHILD.format(repo=str(REPO), bench=str(REPO / "benchmarks"), batches=batches_file, steps=steps,
                         threads=threads)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode:
        return {"rate": 0.0, "loaded": "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=str(REPO / "runs" / "quickstart" / "dataset"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--lib", action="append", default=[], metavar="NAME=PATH",
                    help="another allocator library to preload (repeatable)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VAR=VALUE,VAR=VALUE",
                    help="another candidate: glibc's malloc with these environment variables (repeatable)")
    args = ap.parse_args()

    import tempfile

    from train import dataset_rows

    from backpack.runtime.allocator import find_tcmalloc, worker_env

    store = dataset_rows(Path(args.dataset), 64)
    rows = store.read().to_pylist()
    rows = [{k: v for k, v in r.items() if not isinstance(v, bytes)} for r in rows if r["status"] == "ok"]
    batches = [rows[i:i + args.batch_size] for i in range(0, len(rows) - args.batch_size + 1, args.batch_size)]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(batches, f, default=str)
    # the baseline: glibc as `training.allocator: system` runs it (one arena), what a fresh machine trained with
    candidates = {"glibc, 1 arena (system)": worker_env("system", environ={}), "glibc defaults": {},
                  "auto: glibc keeps memory": worker_env("auto", environ={})}
    if find_tcmalloc():
        candidates["tcmalloc (system package)"] = worker_env("tcmalloc", environ={})
    for spec in args.lib:
        name, _, path = spec.partition("=")
        candidates[name] = {"LD_PRELOAD": path}
    for spec in args.env:
        name, _, pairs = spec.partition("=")
        candidates[name] = dict(pair.split("=", 1) for pair in pairs.split(","))
    print(f"{len(batches)} batches of {args.batch_size}, {args.steps} steps, {args.threads} threads, "
          f"{args.rounds} rounds", flush=True)
    best: dict[str, float] = {}
    rss: dict[str, float] = {}
    for r in range(args.rounds):
        for name, env in candidates.items():
            res = run_once(env, f.name, args.steps, args.threads)
            print(f"  round {r + 1} {name:28} {res['rate']:7.1f} tok/s, peak RSS {res.get('rss_gib', 0):.2f} GiB "
                  f"(preloaded: {res['loaded']})", flush=True)
            best[name] = max(best.get(name, 0.0), res["rate"])
            rss[name] = max(rss.get(name, 0.0), res.get("rss_gib", 0.0))
    os.unlink(f.name)
    base = best["glibc, 1 arena (system)"]
    print(f"\n{'allocator':30} {'tok/s':>8} {'ratio':>6} {'peak RSS GiB':>13}")
    for name, rate in best.items():
        print(f"{name:30} {rate:8.1f} {rate / base if base else 0:6.2f} {rss[name]:13.2f}")
    print(f"allocator: auto {best['auto: glibc keeps memory'] / base if base else 0:.2f}x glibc malloc")
    return 0


if __name__ == "__main__":
    sys.exit(main())
