"""What the hf teacher's shared-prefix prefill saves: the same batch decoded with and without it.

    .venv/bin/python benchmarks/prefix_sharing.py [--prompts 64] [--max-new-tokens 64] [--repeat 2]
                                                  [--system-repeats 0 2]

`decode_batch` forwards the tokens that the prompts of a prefill group share (the chat template's system prompt,
a task's instructions) once for the group instead of once per prompt (backpack/teachers/prefill.py). This runs
the default SmolLM2-135M-Instruct on the shipped prompts, one batch of --prompts, greedy, in this process with
every core, alternating `share_prefix=True` (measured) and `share_prefix=False` (the baseline: every prompt
forwarded whole) --repeat times each, for each --system-repeats R: R=0 keeps the prompts as they are (most
get the template's default 24-token system prompt), R>0 gives every prompt the same system prompt of R
copies of a ~90-token instruction paragraph (a distillation prompt template). Prints prompt tokens, the
prefill seconds and generated tokens/s (medians) of both, the ratio, and whether the answers are identical
(they must be: sharing changes what is computed, not the result).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

INSTRUCTIONS = ("You are the support assistant of a bicycle maker. Answer in at most three sentences, politely, "
                "and only with facts you are sure of. If a question is about orders, warranty, returns or repairs, "
                "say which policy applies and what the customer should do next. Never invent prices, dates or "
                "model names; if you do not know, say so and point the customer to the help desk. ")


def batch(teacher, n: int, system_repeats: int):
    """Left-padded input ids and attention of the first `n` shipped prompts, with the shared system prompt."""
    from backpack.core.types import DecodingParams, Query
    from backpack.data.prompts import read_prompts
    from backpack.teachers.decode import left_pad

    queries, _ = read_prompts(REPO / "examples" / "prompts.jsonl", DecodingParams())
    ids = []
    for q in queries[:n]:
        messages = q.messages
        if system_repeats:
            messages = [{"role": "system", "content": INSTRUCTIONS * system_repeats}]
            messages += [m for m in q.messages if m["role"] != "system"]
        ids.append(teacher._encode(Query(messages=messages)))
    return left_pad(ids, teacher.tokenizer.pad_token_id)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--system-repeats", type=int, nargs="+", default=[0, 2])
    args = ap.parse_args()

    import torch

    import backpack.teachers.decode as decode
    from backpack.config import TeacherConfig
    from backpack.core.types import DecodingParams
    from backpack.teachers.hf import HFTeacher

    threads = os.cpu_count() or 2
    teacher = HFTeacher(TeacherConfig(name="smollm2", threads=threads))
    timed = {}
    prefill = decode.prefill

    def timed_prefill(*a, **k):  # the prefill's own seconds, beside the whole batch's
        t = time.perf_counter()
        out = prefill(*a, **k)
        timed["prefill"] = time.perf_counter() - t
        return out

    decode.prefill = timed_prefill
    p = DecodingParams(max_new_tokens=args.max_new_tokens)
    print(f"{args.prompts} prompts, max_new_tokens={args.max_new_tokens}, greedy, {threads} threads, "
          f"median of {args.repeat} runs each, share_prefix on and off alternating")
    print(f"{'system prompt':>24} {'prompt tok':>10} {'sharing':>8} {'prefill s':>9} {'tok/s':>7} {'x off':>6}  same")
    for repeats in args.system_repeats:
        ids, attention = batch(teacher, args.prompts, repeats)
        runs = {True: [], False: []}

        def measure():  # on the teacher's torch thread, as its own batches run (teachers/hf.py says why)
            with torch.inference_mode():
                decode.decode_batch(teacher.model, ids[:2], attention[:2], p, teacher.stop_ids)  # warm-up
                for r in range(args.repeat):
                    for share in ((True, False) if r % 2 == 0 else (False, True)):
                        t = time.perf_counter()
                        d = decode.decode_batch(teacher.model, ids, attention, p, teacher.stop_ids,
                                                share_prefix=share)
                        seconds = time.perf_counter() - t
                        runs[share].append((seconds, timed["prefill"], d.tokens))

        teacher._on_torch_thread(measure)
        answers = runs[False][0][2]
        same = all(run[2] == answers for run in runs[True] + runs[False])
        tokens = sum(map(len, answers))
        rate = {s: tokens / statistics.median(run[0] for run in runs[s]) for s in runs}
        label = "template default" if not repeats else f"{repeats} x instructions"
        for s in (False, True):
            pre = statistics.median(run[1] for run in runs[s])
            print(f"{label:>24} {int(attention.sum()):>10} {'on' if s else 'off':>8} {pre:>9.2f} {rate[s]:>7.1f} "
                  f"{rate[s] / rate[False]:>6.2f}  {'yes' if same else 'NO'}")
        if not same:
            print("  the answers differ with and without sharing: that is a bug", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
