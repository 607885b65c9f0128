"""`backpack serve` against vLLM's own OpenAI server and against the old one-request-at-a-time server, on the same
student weights (the default model, as `backpack export --format hf` writes it), on this machine.

    .venv/bin/python benchmarks/serve.py                       # levels 1, 4, 16, 32
    .venv/bin/python benchmarks/serve.py --levels 1,16 --requests 2

Load: at each level N, N clients each send `--requests` short chat requests back to back (streamed, greedy,
64 new tokens at most), all starting together. Per level and server: throughput (completion tokens / wall
time), p50 and p95 request latency, p50 time to first token. The three servers run one after another with the
same threads (2). Also the export sizes and load times, and the q8_0 GGUF's NLL against full precision.

The last line it prints (read by a script):
`serve: 16 clients <t> tok/s = <r>x vllm serve; 1 client p50 <l>x; <s>x the old server`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPTS = ["What is the capital of France?", "Give me a tip for sleeping better.", "What is a neural network?",
           "Name three fruits.", "Why is the sky blue?", "Write a haiku about rain.", "How do plants grow?",
           "What is 12 times 7?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    """N clients, each `requests` streamed chat requests back to back; latency, first token, throughput."""
    import openai

    api = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    latencies, firsts, tokens = [], [], 0

    async def client(c: int) -> None:
        nonlocal tokens
        for r in range(requests):
            t0 = time.perf_counter()
            first = None
            stream = await api.chat.completions.create(
                model=model, messages=[{"role": "user", "content": PROMPTS[(c + r) % len(PROMPTS)]}],
                max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - t0
                if chunk.usage:
                    tokens += chunk.usage.completion_tokens
            latencies.append(time.perf_counter() - t0)
            firsts.append(first if first is not None else latencies[-1])
    t0 = time.perf_counter()
    async with api:  # closed on this loop, before asyncio.run closes it
        await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"clients": clients, "tok_s": tokens / wall, "p50": statistics.median(latencies), "p95": q[18],
            "ttft_p50": statistics.median(firsts), "tokens": tokens, "wall": wall}


@contextlib.contextmanager
def backpack_server(cfg, max_batch: int):
    """`backpack serve` in a child process (its own interpreter, as a user runs it) at max_batch."""
    port = free_port()
    config = Path(tempfile.mkdtemp()) / "serve.json"
    data = json.loads(cfg.model_dump_json(by_alias=True))
    data["serve"] = {**data["serve"], "port": port, "threads": 2, "max_batch": max_batch, "max_new_tokens": 64,
                     "max_queue": 256}
    config.write_text(json.dumps(data))
    proc = subprocess.Popen([sys.executable, "-m", "backpack.cli", "serve", str(config), "--version", "0"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc)
        yield f"http://127.0.0.1:{port}/v1", cfg.name
    finally:
        proc.terminate()
        proc.wait(60)


@contextlib.contextmanager
def vllm_server(model_dir: str):
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--port", str(port),
           "--host", "127.0.0.1", "--served-model-name", "student", "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "2048", "--kv-cache-memory-bytes", str(2**30)]
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc, 600)
        yield f"http://127.0.0.1:{port}/v1", "student"
    finally:
        proc.terminate()
        proc.wait(60)


def wait_ready(url: str, proc, seconds: float = 300) -> None:
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server at {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"the server at {url} did not start within {seconds} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="1,4,16,32")
    ap.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    from backpack.config import validate_config
    from backpack.run.export import export
    from backpack.teachers.loader import resolve_model

    root = Path(tempfile.mkdtemp(prefix="backpack-serve-"))
    try:
        base = resolve_model("default").path
        cfg = validate_config({"name": "student", "storage": {"path": str(root / "runs")},
                               "teachers": [{"name": "t", "model": base}],
                               "prompts": {"path": str(REPO / "examples" / "prompts.jsonl")},
                               "student": {"base": base, "mode": "full"}})
        exports = {}
        for fmt, quant, out in (("hf", None, root / "hf"), ("gguf", "f16", root / "f16.gguf"),
                                ("gguf", "q8_0", root / "q8.gguf")):
            t0 = time.perf_counter()
            r = export(cfg, 0, fmt, str(out), quant)
            exports[quant or fmt] = {"bytes": r.bytes, "load_s": r.load_seconds, "check": r.check,
                                     "export_s": time.perf_counter() - t0}
            print(f"export {quant or fmt}: {r.bytes / 2**20:.1f} MiB, loads in {r.load_seconds:.1f} s, "
                  f"{time.perf_counter() - t0:.0f} s to export and check; {r.check}", flush=True)
        results = {}
        for name, server in (("backpack", lambda: backpack_server(cfg, 16)), ("old", lambda: backpack_server(cfg, 1)),
                             ("vllm", lambda: vllm_server(str(root / "hf")))):
            with server() as (url, model):
                asyncio.run(load(url, model, 1, 1, args.max_tokens))  # warm-up
                for n in levels:
                    r = asyncio.run(load(url, model, n, args.requests, args.max_tokens))
                    results[(name, n)] = r
                    print(f"{name:>8} {n:>3} clients: {r['tok_s']:7.1f} tok/s, p50 {r['p50']:.2f} s, p95 "
                          f"{r['p95']:.2f} s, first token p50 {r['ttft_p50']:.2f} s ({r['tokens']} tokens)",
                          flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    print("| clients | server | tok/s | p50 s | p95 s | first token p50 s |")
    print("|---|---|---|---|---|---|")
    for (name, n), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"| {n} | {name} | {r['tok_s']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['ttft_p50']:.2f} |")
    top = 16 if 16 in levels else max(levels)
    low = 1 if 1 in levels else min(levels)
    t = results[("backpack", top)]["tok_s"]
    ratio = t / results[("vllm", top)]["tok_s"]
    p50 = results[("backpack", low)]["p50"] / results[("vllm", low)]["p50"]
    old = t / results[("old", top)]["tok_s"]
    print(f"serve: {top} clients {t:.1f} tok/s = {ratio:.2f}x vllm serve; {low} client p50 {p50:.2f}x; "
          f"{old:.2f}x the old server")
    return 0


if __name__ == "__main__":
    sys.exit(main())
