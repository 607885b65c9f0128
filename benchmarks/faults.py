"""Faults and bad inputs: nothing accepted is lost, and nothing a user sends gets a traceback.

    .venv/bin/python benchmarks/faults.py                   # both parts (~12 minutes)
    .venv/bin/python benchmarks/faults.py --part stream     # the stream under faults only
    .venv/bin/python benchmarks/faults.py --part inputs     # the bad-input corpus only (~2 minutes)

The stream: a continual run fed a stream of prompts (2,000 by default) while a teacher, the scheduler and a
trainer worker are killed, the driver is SIGKILLed and started again, Redis is paused for 40 s and restarted
(benchmarks/fault_stream.py says how). Counted by prompt id at the end: pushed, answered, failed with a
reason, failed without one, lost, duplicated rows, and the training steps redone after each resume.

The bad-input corpus: generated bad inputs (deep JSON, huge numbers, wrong types, NaN and infinities, control
characters, truncated and binary files) through every door a user has: run configs (`backpack validate`, as
every command loads them), prompt files (as `generate` and `ingest` read them), knowledge packs, intake pushes
(the Python API applications use, on a real Redis) and student-server requests (over HTTP, the default model).
Each must get one clear message (an exit status of 2, an InputError, a rejected record with its reason) or a
4xx; a traceback, an exception of any other kind, or a 5xx is counted against it. An input that turns out to be
valid (accepted) is counted apart: it is not bad.

The last line it prints (read by a script):
`faults: <n> prompts, lost <l>, duplicated <d>, failed without reason <f>; bad inputs <b>, tracebacks or 5xx <t>`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEEP = 50_000  # nesting depth of the "deep" values: past Python's recursion limit

# (label, value): what a careless or hostile producer sends in place of a field's value
NASTY = [
    ("deep list", "DEEP"), ("huge int", 10 ** 400), ("negative", -1), ("NaN", math.nan), ("infinity", math.inf),
    ("empty string", ""), ("control chars", "\x00\x07\x1b[31m\r\n"), ("long string", "x" * 2_000_000),
    ("list", [1, 2]), ("mapping", {"a": 1}), ("bool", True), ("null", None), ("lone surrogate", "\ud800"),
    ("zero", 0),
]


def deep_json(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


def to_json(value) -> str:
    """JSON text of a value, with the deep marker spelled out and NaN/Infinity as Python's json writes them."""
    text = json.dumps(value, allow_nan=True)
    return text.replace('"DEEP"', deep_json())


class Tally:
    """Outcomes per door: refused (clearly), accepted (the input was valid after all), broken (a traceback, an
    unexpected exception, a 5xx), with the first few broken cases kept to print."""

    def __init__(self):
        self.counts: dict[str, Counter] = {}
        self.broken: list[str] = []  # "door: case: the last line of what went wrong"

    def add(self, door: str, outcome: str, case: str = "", detail: str = "") -> None:
        self.counts.setdefault(door, Counter())[outcome] += 1
        if outcome == "broken":
            last = detail.strip().splitlines()[-1] if detail.strip() else ""
            self.broken.append(f"{door}: {case}: {last[:300]}")

    def total(self, outcome: str | None = None) -> int:
        return sum(c[outcome] if outcome else sum(c.values()) for c in self.counts.values())


# ---------------------------------------------------------------- run configs

CONFIG_FIELDS = ["name", "teachers.0.replicas", "teachers.0.batch_size", "teachers.0.model", "decoding.max_new_tokens",
                 "decoding.temperature", "decoding.n", "prompts.path", "storage.path", "redis.url",
                 "student.lora_r", "training.lr", "training.max_steps", "serve.port", "scheduler"]


def _set(data: dict, dotted: str, value) -> dict:
    out = json.loads(json.dumps(data))
    node, *path, last = [out, *dotted.split(".")]
    cur = node
    for key in path:
        cur = cur[int(key)] if isinstance(cur, list) else cur.setdefault(key, {})
    if isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value
    return out


def _cli(argv: list[str]) -> tuple[int | None, str]:
    from backpack.cli import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 2
    except BaseException:  # noqa: BLE001 - what the corpus is looking for
        return None, traceback.format_exc()
    return code, err.getvalue()


def _judge_cli(tally: Tally, door: str, case: str, code, err: str) -> None:
    if code is None or "Traceback" in err or code not in (0, 2):
        tally.add(door, "broken", case, err)
    else:
        tally.add(door, "accepted" if code == 0 else "refused")


def config_corpus(tally: Tally, tmp: Path) -> None:
    import yaml

    base = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    base["prompts"]["path"] = str(REPO / "examples" / "prompts.jsonl")
    for field in CONFIG_FIELDS:
        for label, value in NASTY:
            path = tmp / "config.json"
            path.write_text(to_json(_set(base, field, value)), encoding="utf-8", errors="surrogatepass")
            code, err = _cli(["validate", str(path)])
            _judge_cli(tally, "run config", f"{field}={label}", code, err)
    good = (REPO / "examples" / "quickstart.yaml").read_bytes()
    files = {"truncated yaml": good[: len(good) // 2] + b"\n  - [", "binary": bytes(range(256)) * 4,
             "not a mapping": b"- just\n- a list\n", "empty": b"", "deep yaml": b"a: " + deep_json().encode(),
             "yaml alias bomb": b"a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
                                b"c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n",
             "utf-16": "name: x\n".encode("utf-16"), "tab indented": b"name: x\nteachers:\n\t- name: a\n"}
    for label, data in files.items():
        path = tmp / "config.yaml"
        path.write_bytes(data)
        code, err = _cli(["validate", str(path)])
        _judge_cli(tally, "run config", label, code, err)
    for override in ("decoding.top_p=nan", "teachers.0.replicas=1e400", "name=\x1b[2J", "x.y.z=1", "=1",
                     "teachers.99.name=a", "decoding=[[[", "storage.path=\x00"):
        code, err = _cli(["validate", str(REPO / "examples" / "quickstart.yaml"), override])
        _judge_cli(tally, "run config", f"override {override!r}", code, err)


# ---------------------------------------------------------------- prompt files

PROMPT_FIELDS = ["prompt", "messages", "task", "id", "teacher", "decoding", "system"]


def prompt_corpus(tally: Tally, tmp: Path) -> None:
    from backpack.core.types import DecodingParams
    from backpack.data.prompts import read_prompts
    from backpack.errors import InputError

    records = [(f"{field}={label}", {"prompt": "hello", field: value}) for field in PROMPT_FIELDS
               for label, value in NASTY]
    records += [("messages of a bad role", {"messages": [{"role": "root", "content": "x"}]}),
                ("decoding.max_new_tokens huge", {"prompt": "x", "decoding": {"max_new_tokens": 10 ** 12}}),
                ("decoding n=64 unsampled", {"prompt": "x", "decoding": {"n": 64}})]
    for case, rec in records:
        path = tmp / "prompts.jsonl"
        path.write_text(to_json(rec) + "\n", encoding="utf-8", errors="surrogatepass")
        _judge_prompts(tally, case, path, read_prompts, DecodingParams, InputError)
    files = {"truncated": b'{"prompt": "a"}\n{"prompt": "b', "binary": bytes(range(256)), "nul bytes": b"\x00" * 64,
             "a JSON array": b'[{"prompt": "a"}]', "bad UTF-8": b'{"prompt": "\xff\xfe"}\n', "deep line":
             deep_json().encode() + b"\n", "huge number": b'{"prompt": "a", "id": 1e999}\n', "empty": b""}
    for label, data in files.items():
        path = tmp / "prompts.jsonl"
        path.write_bytes(data)
        _judge_prompts(tally, f"file: {label}", path, read_prompts, DecodingParams, InputError)
    path = tmp / "prompts.parquet"
    path.write_bytes(b"PAR1 truncated")
    _judge_prompts(tally, "file: truncated parquet", path, read_prompts, DecodingParams, InputError)


def _judge_prompts(tally, case, path, read_prompts, DecodingParams, InputError) -> None:
    try:
        queries, rejected = read_prompts(path, DecodingParams(), caps={"max_new_tokens": 64, "n": 1, "logprobs": 0})
    except InputError:
        tally.add("prompt file", "refused")
        return
    except BaseException:  # noqa: BLE001
        tally.add("prompt file", "broken", case, traceback.format_exc())
        return
    if rejected and all(r.reason for r in rejected):
        tally.add("prompt file", "refused")
    elif rejected:
        tally.add("prompt file", "broken", case, "a rejected record without a reason")
    else:
        tally.add("prompt file", "accepted")


# ---------------------------------------------------------------- knowledge packs

def pack_corpus(tally: Tally, tmp: Path) -> None:
    from backpack.config.knowledge import load_pack
    from backpack.errors import BackpackError

    cases = [(f"{field}={label}", {"tasks": {"support": {field: value}}})
             for field in ("persona", "passages", "experiences") for label, value in NASTY]
    cases += [(f"tasks={label}", {"tasks": value}) for label, value in NASTY[:6]]
    for case, data in cases:
        path = tmp / "pack.json"
        path.write_text(to_json(data), encoding="utf-8", errors="surrogatepass")
        try:
            load_pack(path)
            tally.add("knowledge pack", "accepted")
        except BackpackError:
            tally.add("knowledge pack", "refused")
        except BaseException:  # noqa: BLE001
            tally.add("knowledge pack", "broken", case, traceback.format_exc())


# ---------------------------------------------------------------- intake pushes

def intake_corpus(tally: Tally, tmp: Path) -> None:
    from backpack.errors import InputError
    from backpack.runtime.redis_server import EmbeddedRedis
    from backpack.scheduling.intake import Intake

    with EmbeddedRedis(tmp / "redis") as server:
        intake = Intake(server.url, "faults")
        for field in ("prompt", "messages", "task", "id", "teacher", "decoding"):
            for label, value in NASTY:
                if value == "DEEP":
                    value = json.loads(deep_json(900))  # as deep as a JSON parser hands to Python
                kw = {"prompt": "hello"} if field != "prompt" else {}
                try:
                    intake.push(**{**kw, field: value})
                    tally.add("intake push", "accepted")
                except InputError:
                    tally.add("intake push", "refused")
                except BaseException:  # noqa: BLE001
                    tally.add("intake push", "broken", f"{field}={label}", traceback.format_exc())


# ---------------------------------------------------------------- server requests

def server_corpus(tally: Tally) -> None:
    import aiohttp

    from backpack.config import ServeConfig, StudentConfig
    from backpack.serve.server import StudentServer

    bodies = [(f"{field}={label}", to_json({"messages": [{"role": "user", "content": "hi"}], field: value}))
              for field in ("messages", "max_tokens", "temperature", "top_p", "n", "stream", "seed", "task")
              for label, value in NASTY]
    bodies += [("not JSON", "{"), ("deep", deep_json()), ("binary", bytes(range(256)).decode("latin-1")),
               ("too big", json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]})),
               ("empty", ""), ("a list", "[]")]

    async def main():
        server = StudentServer(StudentConfig(), ServeConfig(port=0, max_new_tokens=4))
        url = await server.start()
        try:
            async with aiohttp.ClientSession(base_url=url) as http:
                for case, body in bodies:
                    async with http.post("/v1/chat/completions", data=body.encode("utf-8", "surrogatepass"),
                                         headers={"Content-Type": "application/json"}) as r:
                        text = await r.text()
                        if r.status >= 500 or "Traceback" in text:
                            tally.add("server request", "broken", case, f"{r.status} {text}")
                        elif r.status >= 400 and r.content_type != "application/json":
                            tally.add("server request", "broken", case, f"{r.status} not JSON: {text[:200]}")
                        else:
                            tally.add("server request", "refused" if r.status >= 400 else "accepted")
        finally:
            await server.stop()
    asyncio.run(main())


def run_inputs() -> Tally:
    tally = Tally()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, part in (("run configs", lambda: config_corpus(tally, tmp)),
                           ("prompt files", lambda: prompt_corpus(tally, tmp)),
                           ("knowledge packs", lambda: pack_corpus(tally, tmp)),
                           ("intake pushes", lambda: intake_corpus(tally, tmp)),
                           ("server requests", lambda: server_corpus(tally))):
            print(f"  {name}...", flush=True)
            part()
    return tally


def print_inputs(tally: Tally) -> None:
    print(f"\n{'door':16} {'inputs':>7} {'refused':>8} {'accepted':>9} {'traceback/5xx':>14}")
    for door, c in tally.counts.items():
        print(f"{door:16} {sum(c.values()):7} {c['refused']:8} {c['accepted']:9} {c['broken']:14}")
    print(f"{'all':16} {tally.total():7} {tally.total('refused'):8} {tally.total('accepted'):9} "
          f"{tally.total('broken'):14}")
    for line in tally.broken:
        print(f"  broken: {line}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "stream", "inputs"], default="all")
    ap.add_argument("--prompts", type=int, default=2000, help="prompts pushed in the stream")
    ap.add_argument("--seed", type=int, default=0, help="the faults' order and moments")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the six faults, each in its own order")
    ap.add_argument("--minutes", type=float, default=40.0, help="the stream gives up after this long")
    args = ap.parse_args()
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))
    stream = tally = None
    if args.part in ("all", "stream"):
        from fault_stream import print_stream, run_stream

        print(f"stream: {args.prompts} prompts, {args.rounds} round(s) of faults in a shuffled order (seed {args.seed}):", flush=True)
        stream = run_stream(args.prompts, args.seed, args.minutes, args.rounds)
        print_stream(stream)
    if args.part in ("all", "inputs"):
        print("\nbad-input corpus:", flush=True)
        tally = run_inputs()
        print_inputs(tally)
    if stream and tally:
        c = stream["counts"]
        print(f"\nfaults: {c['pushed']} prompts, lost {c['lost']}, duplicated {c['duplicated']}, failed without "
              f"reason {c['failed without reason']}; bad inputs {tally.total() - tally.total('accepted')}, "
              f"tracebacks or 5xx {tally.total('broken') + stream['tracebacks']}")
    elif stream:
        c = stream["counts"]
        print(f"\nfaults: {c['pushed']} prompts, lost {c['lost']}, duplicated {c['duplicated']}, failed without "
              f"reason {c['failed without reason']}; tracebacks {stream['tracebacks']}")
    else:
        print(f"\nbad inputs {tally.total() - tally.total('accepted')}, tracebacks or 5xx {tally.total('broken')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
