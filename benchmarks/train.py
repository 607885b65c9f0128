"""Student training throughput: Ray Train (1 and 2 workers) against a plain single-process PyTorch loop.

    .venv/bin/python benchmarks/train.py [--dataset runs/quickstart/dataset] [--steps 12] [--batch-size 8]

Same student (the quickstart's: SmolLM2-135M with every other layer, trained in full), same rows, same loss
(CE + top-k KD), same total torch threads. Throughput is answer tokens trained per second at steady state
(the first step of each run is left out as warm-up; both read the same materialized dataset in the same
order, so they train on the same batches); the Ray Train start-up cost is its fit() wall time minus
the time its steps took. Goal: Ray Train with one worker reaches at least 0.90x the plain loop.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent


def dataset_rows(path: Path, n: int):
    from backpack.data.store import DatasetStore

    if (path / "manifest.json").exists():
        return DatasetStore(path, create=False)
    # no quickstart dataset yet: make a small one with the default teacher, in-process
    from backpack.config import TeacherConfig
    from backpack.core.schema import queries_to_table
    from backpack.core.types import DecodingParams
    from backpack.data.prompts import read_prompts
    from backpack.teachers.hf import HFTeacher

    qs, _ = read_prompts(REPO / "examples" / "prompts.jsonl", DecodingParams(max_new_tokens=48, logprobs=4), limit=n)
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    atexit.register(shutil.rmtree, tmp, True)
    store = DatasetStore(Path(tmp) / "ds")
    store.append(HFTeacher(TeacherConfig(name="smol", threads=os.cpu_count() or 2, batch_size=16))
                 .generate(queries_to_table(qs)))
    return store


def plain_loop(batches, student_cfg, tc, steps: int, threads: int) -> tuple[float, list[int]]:
    """(answer tokens/s over steps 2..N, answer tokens of each step) of a plain loop over `batches` (lists of
    rows, in the order a one-worker Ray Train run reads them). Like a Ray Train worker it builds each batch's
    examples (tokenisation, top-k tensors) as it goes, so both paths do the same work per step."""
    import torch

    from backpack.student.autopilot import load_student
    from backpack.student.examples import build_examples, collate
    from backpack.student.step import student_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    st = load_student(student_cfg)
    opt = torch.optim.AdamW([p for p in st.model.parameters() if p.requires_grad], lr=tc.lr)
    st.model.train()
    tokens, per_step, t0 = 0, [], None
    for step in range(steps):
        examples, _ = build_examples(batches[step % len(batches)], st.tokenizer, tc.max_len, True, tc.kd_weight > 0)
        batch = collate(examples, st.tokenizer.pad_token_id, tc.top_k)
        loss, m = student_loss(st.model, batch, tc.kd_weight, tc.divergence)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(st.model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        per_step.append(m["tokens"])
        if step == 0:
            t0 = time.perf_counter()  # warm-up step excluded
        else:
            tokens += m["tokens"]
    return tokens / (time.perf_counter() - t0), per_step


def ray_train(ds, student_cfg, tc, workers: int, threads: int, steps: int) -> tuple[float, float, float, list[int]]:
    """(answer tokens/s at steady state summed over workers, start-up seconds, share of steady-state time rank 0
    spent waiting for its input, answer tokens of each of rank 0's steps) of one Ray Train fit."""
    from backpack.student.trainer import run_training

    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "m.jsonl"
        cfg = tc.model_copy(update={"num_workers": workers, "threads_per_worker": threads, "max_steps": steps,
                                    "log_every": 1, "checkpoint_every": 10_000, "cpus_per_worker": 1.0 / workers})
        res = run_training(ds, student_cfg, cfg, Path(tmp) / "train", "bench",
                           metrics_file=str(metrics))
        logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    # one window per step (log_every=1), measured on rank 0; every worker trains its own batch meanwhile
    prev, windows = 0, []
    for m in logged:
        windows.append((m["tokens_seen"] - prev, m["window_s"], m["data_wait_s"]))
        prev = m["tokens_seen"]
    steady = windows[1:]
    seconds = sum(w[1] for w in steady)
    startup = res.seconds - sum(w[1] for w in windows)
    return (sum(w[0] for w in steady) / seconds * workers, startup, sum(w[2] for w in steady) / seconds,
            [w[0] for w in windows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=str(REPO / "runs" / "quickstart" / "dataset"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()

    import ray

    from backpack.config import StudentConfig, TrainingConfig
    from backpack.data.splits import training_dataset
    from backpack.runtime.allocator import KEEP_MEMORY, worker_env

    store = dataset_rows(Path(args.dataset), 64)
    student = StudentConfig(mode="full", layers="every_other")
    tc = TrainingConfig(batch_size=args.batch_size, max_len=256, kd_weight=0.5, top_k=4, lr=3e-4)
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    # Both paths read the same materialized dataset (what `backpack train` feeds Ray Train) in the same order,
    # so they train on the same batches: step time depends a lot on a batch's lengths and padding.
    ds = training_dataset(store, 0.0)
    batches = [b.to_pylist() for b in ds.iter_batches(batch_size=args.batch_size, batch_format="pyarrow")]
    print(f"{ds.count()} rows, batch {args.batch_size}, {args.steps} steps, {args.threads} threads in all",
          flush=True)
    # The baseline runs in a Ray worker process too (on its main thread), not in this driver: the driver stays
    # idle, and both paths run under the same process conditions (Ray workers run at nice 15) and with the same
    # memory allocator settings (training.allocator's, see backpack/runtime/allocator.py).
    env = worker_env(tc.allocator)
    allocator = "tcmalloc" if "LD_PRELOAD" in env else ("glibc, keeps memory" if env == KEEP_MEMORY else "glibc")

    def baseline(env: dict) -> tuple[float, list[int]]:
        task = ray.remote(num_cpus=args.threads, max_calls=1)(plain_loop)
        return ray.get(task.options(runtime_env={"env_vars": env}).remote(batches, student, tc, args.steps,
                                                                          args.threads))

    base, base_tokens = baseline(env)
    results = [(f"plain PyTorch loop ({allocator})", "1x" + str(args.threads), base, 0.0, 0.0)]
    for workers in (1, 2):
        if args.threads % workers:
            continue
        rate, startup, wait, tokens = ray_train(ds, student, tc, workers, args.threads // workers, args.steps)
        results.append(("Ray Train", f"{workers}x{args.threads // workers}", rate, startup, wait))
        if workers == 1 and tokens != base_tokens:
            print(f"note: Ray Train read other batches than the plain loop (answer tokens per step "
                  f"{tokens} vs {base_tokens}): the ratio compares different work")
    if env != worker_env("system", environ={}):  # what the allocator is worth: the same loop, glibc as it is
        glibc, _ = baseline(worker_env("system", environ={}))
        results.insert(1, ("plain PyTorch loop (glibc)", "1x" + str(args.threads), glibc, 0.0, 0.0))
    ray.shutdown()
    print(f"\n{'path':36} {'workers x threads':>18} {'tok/s':>8} {'ratio':>6} {'start-up s':>11} {'input wait':>11}")
    for name, shape, rate, startup, wait in results:
        print(f"{name:36} {shape:>18} {rate:8.1f} {rate / base:6.2f} {startup:11.1f} {wait:10.0%}")
    one = next(rate for name, shape, rate, _, _ in results if name == "Ray Train" and shape.startswith("1x")) / base
    print(f"\ngoal: Ray Train, 1 worker >= 0.90x the plain loop at steady state: {one:.2f}x -> "
          f"{'met' if one >= 0.9 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
