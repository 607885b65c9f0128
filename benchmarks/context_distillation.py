"""Context distillation on the shipped knowledge pack: does the student carry the knowledge without the context?

    .venv/bin/python benchmarks/context_distillation.py [--config examples/mental.yaml]
        [--questions examples/mental/questions-48.jsonl] [key=value ...]

A fresh run of the config (in a temporary storage folder, removed at exit unless `--keep`, or in
`storage.path=...` when given: a run's checkpoints take gigabytes): the teacher
answers the training prompts with recall (generate), the student trains on the prompts without it (train),
then the held-out questions are answered in four settings and scored for their reference facts (eval). The
baseline is the teacher with context, measured in the same run: the benchmark prints the share of its accuracy
the distilled student recovers without context (goal: at least 0.70), next to the base student's share (what
the student knew before), and the wall time of each stage.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
GOAL = 0.70


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "examples" / "mental.yaml"))
    ap.add_argument("--questions", default=str(REPO / "examples" / "mental" / "questions-48.jsonl"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary run folder (checkpoints, answers)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. training.max_steps=80")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from backpack.config import load_config
    from backpack.eval.knowledge import evaluate_facts, format_facts
    from backpack.run.generate import generate
    from backpack.run.train import train
    from backpack.runtime.progress import Reporter

    overrides, tmp = list(args.overrides), None
    if not any(o.startswith("storage.path=") for o in overrides):
        tmp = tempfile.mkdtemp(prefix="backpack-cd-")
        overrides.append(f"storage.path={tmp}")
        if not args.keep:
            atexit.register(shutil.rmtree, tmp, True)
    os.chdir(REPO)  # the shipped config's paths are relative to the repository
    cfg = load_config(args.config, overrides)

    class Say(Reporter):
        def stage(self, text: str) -> None:
            print(f"  [{time.perf_counter() - t0:6.0f} s] {text}", flush=True)

    t0 = time.perf_counter()
    times = {}
    gen = generate(cfg, Say())
    times["generate"] = time.perf_counter() - t0
    print(f"generate: {gen.ok_rows} answers ({gen.failed_rows} failed), {gen.tokens} tokens in "
          f"{times['generate']:.0f} s", flush=True)
    t1 = time.perf_counter()
    res = train(cfg, Say())
    times["train"] = time.perf_counter() - t1
    print(f"train: step {res['step']}, versions {res['versions']} in {times['train']:.0f} s", flush=True)
    t2 = time.perf_counter()
    out = evaluate_facts(cfg, args.questions, None, Say())
    times["eval"] = time.perf_counter() - t2
    wall = time.perf_counter() - t0

    print()
    print(format_facts(out))
    acc = {s["key"]: s["accuracy"] for s in out["settings"]}
    teacher = acc["teacher"] or float("nan")
    print()
    print(f"baseline (same run): teacher with context {acc['teacher']:.3f}")
    print(f"  base student without context      {acc['base'] / teacher:5.2f}x the baseline")
    print(f"  distilled student without context {acc['distilled'] / teacher:5.2f}x the baseline "
          f"(goal >= {GOAL:.2f}x: {'met' if acc['distilled'] / teacher >= GOAL else 'NOT met'})")
    print(f"  distilled student with recall     {acc['distilled_recall'] / teacher:5.2f}x the baseline")
    print(f"wall time: {wall:.0f} s (generate {times['generate']:.0f} s, train {times['train']:.0f} s, "
          f"eval {times['eval']:.0f} s); run folder {cfg.run_dir}"
          f"{' (removed at exit: --keep keeps it)' if tmp and not args.keep else ''}; answers in {out['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
