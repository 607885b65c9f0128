"""Synthesized prompts against hand-written ones, on this machine with the default model.

    .venv/bin/python benchmarks/synthesis.py                  # both parts
    .venv/bin/python benchmarks/synthesis.py --part seeds     # Self-Instruct from 20 seeds
    .venv/bin/python benchmarks/synthesis.py --part pack      # questions from the shipped knowledge pack

Seeds (`examples/synthesize.yaml`): from the first 20 prompts of `examples/prompts.jsonl`, synthesize `--target`
prompts, the other 280 held out (curation rejects near-copies of them). Printed: the funnel, the teacher tokens,
and the diversity of the kept set against the 280 hand-written prompts (distinct word 2-grams per prompt; mean
pairwise Jaccard similarity of character 5-grams). Then the quickstart student is trained twice for the same
steps, on (a) the 20 seeds and (b) the synthesized set (the teacher answers each), and both final versions are
scored on the 280 held-out prompts, answered by the teacher once: NLL of the teacher's answers, and the judge's
win rate against the teacher (`backpack eval --judge`, both orders; `--judge-prompts` of them).

Pack (`examples/mental.yaml`): the training prompts are synthesized from `examples/mental/pellucid.yaml` alone
(`synthesis.source: pack`, the 48 held-out questions held out), then the shipped context distillation runs on
them and the student is scored without context on the 48 questions (hand-written prompts: 0.427). Judge
agreement: the judge (the default model) scores each of the student's 48 answers from 1 to 10 with the facts as
reference; agreement is how often "score >= 6" matches "at least half the facts given".

The last line it prints (read by a script):
`synthesis: kept <k>/<n>; held-out NLL seeds <a> vs synthesized <b>; pack facts <c> (hand-written 0.427)`
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from on_policy import reporter  # noqa: E402  (benchmarks/ is not a package)

HAND_WRITTEN_FACTS = 0.427


def diversity(prompts: list[str]) -> dict:
    """Distinct word 2-grams per prompt and the mean pairwise Jaccard similarity of character 5-grams."""
    from backpack.data.curation import normal, shingles

    bigrams = {tuple(p) for t in prompts for p in itertools.pairwise(normal(t).split())}
    sets = [shingles(t) for t in prompts]
    sims = [len(a & b) / len(a | b) for a, b in itertools.combinations(sets, 2) if a | b]
    return {"prompts": len(prompts), "bigrams_per_prompt": len(bigrams) / max(1, len(prompts)),
            "mean_similarity": sum(sims) / len(sims) if sims else math.nan}


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def eval_copy(arm_cfg, held_cfg, root: str):
    """The arm's run (its versions and registry) with the held-out prompts' teacher answers as its dataset, nearly
    all of them held out: `evaluate` and `judge` then score the arm's versions on the 280 prompts."""
    from backpack.config import load_config

    dst = Path(root) / arm_cfg.name
    shutil.copytree(arm_cfg.run_dir, dst, ignore=shutil.ignore_patterns("dataset", "eval", "report*"))
    shutil.copytree(held_cfg.dataset_dir, dst / "dataset")
    return load_config(str(REPO / "examples" / "synthesize.yaml"), [
        f"storage.path={root}", f"name={arm_cfg.name}", "eval.heldout_fraction=0.9999", "eval.every_version=false",
        f"prompts.path={arm_cfg.prompts.path}"])


def seeds_part(args, t0: float) -> dict:
    from backpack.config import load_config
    from backpack.run.evaluate import evaluate
    from backpack.run.generate import generate
    from backpack.run.judge import judge
    from backpack.run.synthesize import synthesize
    from backpack.run.train import train

    root = Path(args.keep or tempfile.mkdtemp(prefix="backpack-syn-"))
    if not args.keep:
        atexit.register(shutil.rmtree, root, True)
    records = [json.loads(line) for line in (REPO / "examples" / "prompts.jsonl").read_text().splitlines() if line]
    seeds = write_jsonl(root / "seeds.jsonl", records[:20])
    heldout = write_jsonl(root / "heldout.jsonl", records[20:20 + args.heldout])
    config = str(REPO / "examples" / "synthesize.yaml")
    common = [f"synthesis.seeds={seeds}", "synthesis.seed_limit=null", f"synthesis.heldout={heldout}",
              f"training.max_steps={args.steps}", f"training.checkpoint_every={args.steps}"]

    def cfg(name: str, prompts: str, extra=()):
        return load_config(config, [f"storage.path={root / name}", f"name={name}", f"prompts.path={prompts}",
                                    *common, *extra])

    syn_cfg = cfg("synthesized", "synthesized", [f"synthesis.target={args.target}",
                                                  f"synthesis.rounds={args.rounds}"])
    result = synthesize(syn_cfg, reporter(t0, "synthesize: "))
    for line in result.lines(args.target):
        print("  " + line, flush=True)
    import pyarrow.parquet as pq

    kept = [r["prompt"] for r in pq.read_table(result.path).to_pylist()]
    div = {"synthesized": diversity(kept), "hand-written": diversity([r["prompt"] for r in records[20:20 + args.heldout]])}
    arms = {"seeds": cfg("seeds", seeds), "synthesized": syn_cfg}
    held_cfg = cfg("heldout", heldout)
    generate(held_cfg, reporter(t0, "held-out answers: "))
    out = {"kept": result.kept, "generated": result.generated, "tokens": result.tokens, "diversity": div,
           "funnel": result.funnel, "arms": {}}
    for arm, c in arms.items():
        t1 = time.perf_counter()
        generate(c, reporter(t0, f"{arm} answers: "))
        train(c, reporter(t0, f"{arm}: "))
        e = eval_copy(c, held_cfg, str(root / f"eval-{arm}"))
        e = e.model_copy(update={"eval": e.eval.model_copy(update={"max_rows": None})})
        report = evaluate(e, None, reporter(t0, f"{arm} eval: "))
        last = max(report["versions"], key=lambda v: v["version"])
        j = e.model_copy(update={"eval": e.eval.model_copy(update={"max_rows": args.judge_prompts})})
        judged = judge(j, j.teachers[0].name, [last["version"]], reporter(t0, f"{arm} judge: "))
        out["arms"][arm] = {"nll": last["nll"], "rows": report.get("heldout_rows", None),
                            "judge": judged[str(last["version"])], "seconds": time.perf_counter() - t1}
        p = out["arms"][arm]["judge"]["pairwise"]
        print(f"  {arm}: held-out NLL {last['nll']:.3f}, judge win rate {p['win_rate']:.3f} ± {p['ci95']:.3f}",
              flush=True)
    return out


def pack_part(args, t0: float) -> dict:
    from backpack.config import load_config
    from backpack.core.types import DecodingParams, Query
    from backpack.eval.facts import load_questions, score
    from backpack.eval.judge import parse_rubric, rubric_messages
    from backpack.eval.knowledge import evaluate_facts
    from backpack.run.generate import generate
    from backpack.run.synthesize import synthesize
    from backpack.run.train import train
    from backpack.teachers.hf import HFTeacher

    os.chdir(REPO)  # the shipped config's paths are relative to the repository
    root = args.keep or tempfile.mkdtemp(prefix="backpack-synpack-")
    if not args.keep:
        atexit.register(shutil.rmtree, root, True)
    questions = "examples/mental/questions-48.jsonl"
    extra = [f"training.max_steps={args.fact_steps}"] if args.fact_steps else []
    cfg = load_config("examples/mental.yaml", [
        f"storage.path={root}", "prompts.path=synthesized", "synthesis.source=pack", f"synthesis.heldout={questions}",
        f"synthesis.target={args.pack_target}", f"synthesis.rounds={args.rounds}", "synthesis.max_new_tokens=200",
        *extra])
    result = synthesize(cfg, reporter(t0, "pack synthesize: "))
    for line in result.lines(args.pack_target):
        print("  " + line, flush=True)
    t1 = time.perf_counter()
    generate(cfg, reporter(t0, "pack answers: "))  # the teacher answers with the pack's passages recalled
    train(cfg, reporter(t0, "pack train: "))
    facts = evaluate_facts(cfg, questions, None, reporter(t0, "pack eval: "))
    acc = {s["key"]: s["accuracy"] for s in facts["settings"]}
    print(f"  pack: distilled {acc['distilled']:.3f}, teacher with context {acc['teacher']:.3f}, "
          f"{time.perf_counter() - t1:.0f} s", flush=True)
    # the judge's agreement with the facts, on the distilled student's answers without context
    qs = {q.id: q for q in load_questions(questions)}
    judge = HFTeacher(cfg.teachers[0].model_copy(update={"name": "judge", "batch_size": 16}))
    asked, fact_scores = [], []
    for a in facts["answers"]:
        q = qs[a["id"]]
        reference = "The answer must give these facts: " + "; ".join(f[0] for f in q.facts)
        asked.append(Query(messages=rubric_messages(q.question, a["distilled"], reference),
                           decoding=DecodingParams(max_new_tokens=96)))
        fact_scores.append(score(a["distilled"], q.facts))
    verdicts = [parse_rubric(c.text or "") for c in judge.answer(asked)]
    pairs = [(v[0] >= 6, f >= 0.5) for v, f in zip(verdicts, fact_scores) if v is not None]
    agreement = sum(a == b for a, b in pairs) / len(pairs) if pairs else math.nan
    print(f"  judge agreement with the facts: {agreement:.3f} on {len(pairs)} of {len(asked)} answers "
          f"({sum(v is None for v in verdicts)} unreadable); the judge says good to {sum(a for a, _ in pairs)}, "
          f"the facts to {sum(b for _, b in pairs)}", flush=True)
    return {"kept": result.kept, "generated": result.generated, "tokens": result.tokens, "funnel": result.funnel,
            "accuracy": acc, "agreement": agreement, "judged": len(pairs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["both", "seeds", "pack"], default="both")
    ap.add_argument("--target", type=int, default=400, help="seeds: prompts to synthesize")
    ap.add_argument("--rounds", type=int, default=60, help="most rounds of synthesis requests")
    ap.add_argument("--steps", type=int, default=60, help="seeds: optimizer steps of each arm")
    ap.add_argument("--heldout", type=int, default=280, help="seeds: hand-written prompts held out (after the 20)")
    ap.add_argument("--judge-prompts", type=int, default=280, help="seeds: held-out prompts the judge reads")
    ap.add_argument("--pack-target", type=int, default=192, help="pack: questions to synthesize (192 hand-written)")
    ap.add_argument("--fact-steps", type=int, default=0, help="pack: optimizer steps (0: the shipped config's)")
    ap.add_argument("--keep", default=None, metavar="DIR", help=(
        "keep the runs in DIR (a rerun with the same DIR reuses the stored replies, answers and checkpoints)"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    s = seeds_part(args, t0) if args.part in ("both", "seeds") else None
    p = pack_part(args, t0) if args.part in ("both", "pack") else None
    print()
    if s:
        print("| set | prompts | distinct 2-grams per prompt | mean pairwise similarity |")
        print("|---|---|---|---|")
        for name, d in s["diversity"].items():
            print(f"| {name} | {d['prompts']} | {d['bigrams_per_prompt']:.2f} | {d['mean_similarity']:.4f} |")
        print(f"teacher tokens for the synthesized set: {s['tokens']}")
        print("| trained on | held-out NLL | judge win rate ± 95% | wins/ties/losses | score | unreadable | trained in |")
        print("|---|---|---|---|---|---|---|")
        for arm, a in s["arms"].items():
            j = a["judge"]
            pw = j["pairwise"]
            print(f"| {arm} | {a['nll']:.3f} | {pw['win_rate']:.3f} ± {pw['ci95']:.3f} | "
                  f"{pw['wins']}/{pw['ties']}/{pw['losses']} | {j['rubric']['mean']:.2f} | "
                  f"{pw['unparsed'] + j['rubric']['unparsed']} of {3 * j['prompts']} | {a['seconds']:.0f} s |")
    if p:
        print(f"pack: kept {p['kept']}/{p['generated']} ({p['tokens']} teacher tokens); fact accuracy without "
              f"context {p['accuracy']['distilled']:.3f}, teacher with context {p['accuracy']['teacher']:.3f}; "
              f"judge agreement {p['agreement']:.3f} on {p['judged']} answers")
    print(f"wall time: {time.perf_counter() - t0:.0f} s")
    nan = math.nan
    k, n = (s["kept"], s["generated"]) if s else (p["kept"], p["generated"]) if p else (0, 0)
    a = s["arms"]["seeds"]["nll"] if s else nan
    b = s["arms"]["synthesized"]["nll"] if s else nan
    c = p["accuracy"]["distilled"] if p else nan
    print(f"synthesis: kept {k}/{n}; held-out NLL seeds {a:.3f} vs synthesized {b:.3f}; pack facts {c:.3f} "
          f"(hand-written {HAND_WRITTEN_FACTS})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
