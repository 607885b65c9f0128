"""What prepacking the hf teacher's linear weights for oneDNN buys on CPU: the same batch decoded both ways.

    .venv/bin/python benchmarks/prepacked_weights.py [--prompts 64] [--max-new-tokens 64] [--repeat 2]

`teacher.prepack_weights` (on by default) replaces the model's `nn.Linear` layers by `PackedLinear`s whose weights
were reordered once into oneDNN's blocked layout (backpack/teachers/packed.py). This loads the default
SmolLM2-135M-Instruct once as an hf teacher without it, packs a copy of every linear layer, and decodes the first
--prompts shipped prompts (one batch, greedy, every core) alternating the plain and the packed layers --repeat
times each, on the teacher's own torch thread. Prints generated tokens/s (medians) of both, the ratio, and how
many answers are identical token for token (two matmul kernels round differently, so a near-tie can flip).
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    import torch

    from backpack.config import TeacherConfig
    from backpack.core.types import DecodingParams, Query
    from backpack.data.prompts import read_prompts
    from backpack.teachers.decode import decode_batch, left_pad
    from backpack.teachers.hf import HFTeacher
    from backpack.teachers.packed import PackedLinear, can_pack, linear_slots

    threads = os.cpu_count() or 2
    teacher = HFTeacher(TeacherConfig(name="smollm2", threads=threads, prepack_weights=False))
    if not can_pack(teacher.model):
        sys.exit("this PyTorch build has no oneDNN linear ops (or the model is not float32 on CPU)")
    slots = linear_slots(teacher.model)
    packed = teacher._on_torch_thread(lambda: [PackedLinear(child) for _, _, child in slots])

    def use(pack: bool) -> None:
        for (parent, name, child), alt in zip(slots, packed):
            setattr(parent, name, alt if pack else child)

    queries, _ = read_prompts(REPO / "examples" / "prompts.jsonl", DecodingParams())
    ids = [teacher._encode(Query(messages=q.messages)) for q in queries[:args.prompts]]
    x, mask = left_pad(ids, teacher.tokenizer.pad_token_id)
    p = DecodingParams(max_new_tokens=args.max_new_tokens)
    runs = {False: [], True: []}

    def measure():
        with torch.inference_mode():
            for pack in (False, True):  # warm-up both
                use(pack)
                decode_batch(teacher.model, x[:2], mask[:2], p, teacher.stop_ids)
            for r in range(args.repeat):
                for pack in ((True, False) if r % 2 == 0 else (False, True)):
                    use(pack)
                    t = time.perf_counter()
                    d = decode_batch(teacher.model, x, mask, p, teacher.stop_ids)
                    runs[pack].append((time.perf_counter() - t, d.tokens))

    teacher._on_torch_thread(measure)
    print(f"{args.prompts} prompts, max_new_tokens={args.max_new_tokens}, greedy, {threads} threads, "
          f"median of {args.repeat} runs each, plain and prepacked alternating")
    rate = {}
    for pack in (False, True):
        tokens = sum(map(len, runs[pack][0][1]))
        rate[pack] = tokens / statistics.median(s for s, _ in runs[pack])
    same = sum(a == b for a, b in zip(runs[False][0][1], runs[True][0][1]))
    print(f"plain linear layers      {rate[False]:7.1f} tok/s")
    print(f"prepacked for oneDNN     {rate[True]:7.1f} tok/s   {rate[True] / rate[False]:.2f}x")
    print(f"identical answers: {same} of {len(ids)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
