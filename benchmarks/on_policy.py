"""On-policy against off-policy distillation: same student, same prompts, same seed.

    .venv/bin/python benchmarks/on_policy.py                       # both parts
    .venv/bin/python benchmarks/on_policy.py --part quickstart     # the quickstart's student only
    .venv/bin/python benchmarks/on_policy.py --part facts          # the shipped knowledge pack only

Quickstart (`examples/quickstart.yaml`: every other layer of SmolLM2-135M trained in full, the default model as
teacher): the teacher answers the prompts once (`generate`); then the student is trained twice from the same
base for the same steps, off-policy (today's recipe: the teacher's answers, sequence + token-level KD) and
on-policy (its own samples scored by the teacher; the config's on_policy.loss, forward KL on the teacher's
top-k), each checkpoint a student version. Every version is scored on the held-out prompts: the reverse KL from
the student to the teacher on the student's own samples (temperature 1, seeded; the teacher scores them in this
process: log q - log p per token) and the NLL of the teacher's answers. Teacher tokens spent by a version:
off-policy, the answer tokens of the distinct rows trained on up to its step (the teacher wrote them for that);
on-policy, the tokens the teachers scored up to its step (its steps read only the prompts of the rows). The
ratio printed is off-policy's tokens at its final version over on-policy's tokens at its first version that
scores as well on both (reverse KL per token alone is won by a student that learns to write almost nothing); 0
when none does.

Facts (`examples/mental.yaml`, 48 held-out questions): today's context distillation and on-policy context
distillation (the teacher scores the student's answers with the recalled passage, the student writes without),
then fact accuracy without context, and the teacher with context as the baseline, measured in the same run.

The last line it prints (read by a script):
`on-policy: <x>x fewer teacher tokens to off-policy's final score; facts off-policy <a> on-policy <b> teacher-with-context <c>`
"""

from __future__ import annotations

import argparse
import atexit
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


class Say:
    def __init__(self, t0: float, prefix: str):
        self.t0, self.prefix = t0, prefix

    def stage(self, text: str) -> None:
        print(f"  [{time.perf_counter() - self.t0:6.0f} s] {self.prefix}{text}", flush=True)


def reporter(t0: float, prefix: str):
    from backpack.runtime.progress import Reporter

    class _R(Reporter):
        def stage(self, text: str) -> None:
            Say(t0, prefix).stage(text)

    return _R()


def arm_config(path: str, storage: str, objective: str, overrides: list[str]):
    from backpack.config import load_config

    return load_config(path, [f"storage.path={storage}", f"training.objective={objective}", *overrides])


def copy_dataset(src_cfg, dst_cfg) -> None:
    """The teacher's answers of one arm's run, given to the other arm's (same name, another storage)."""
    shutil.copytree(src_cfg.run_dir / "dataset", dst_cfg.run_dir / "dataset")


def reverse_kl_and_nll(cfg, version_meta, held: list[dict], teacher, seed: int = 0) -> dict:
    """A version's held-out reverse KL to `teacher` on its own samples, and the NLL of the teacher's answers."""
    import torch

    from backpack.core.types import DecodingParams, Query
    from backpack.eval.evaluate import evaluate_model
    from backpack.student.registry import load_version
    from backpack.teachers.hf import HFTeacher

    student = load_version(version_meta, cfg.student, merge=True)
    m = evaluate_model(student.model, student.tokenizer, held, "student", 8, cfg.training.max_len,
                       top_k=cfg.training.top_k, batch_size=cfg.eval.batch_size, generate=False)
    writer = HFTeacher.from_model("student", student.model, student.tokenizer, "student", batch_size=16)
    asked = [Query(messages=r["messages"], decoding=DecodingParams(
        max_new_tokens=cfg.training.on_policy.max_new_tokens, temperature=1.0, logprobs=1)) for r in held]
    torch.manual_seed(seed)
    samples = writer.answer(asked)
    scored = teacher.answer([Query(messages=q.messages, score_ids=c.token_ids, decoding=DecodingParams())
                             for q, c in zip(asked, samples) if c.token_ids])
    q_lp = [lp for c in samples if c.token_ids for lp in c.token_logprobs]
    p_lp = [lp for c in scored for lp in c.token_logprobs]
    return {"reverse_kl": sum(a - b for a, b in zip(q_lp, p_lp)) / max(1, len(q_lp)), "nll": m["nll"]}


def quickstart(args, t0: float) -> dict:
    """Both arms on the quickstart; returns the ratio and the curves."""
    from backpack.config import TeacherConfig
    from backpack.data.splits import split
    from backpack.data.storage import run_files
    from backpack.data.store import DatasetStore
    from backpack.run.generate import generate
    from backpack.run.train import train
    from backpack.runtime.session import attach_redis
    from backpack.student.registry import Registry
    from backpack.teachers.hf import HFTeacher

    config = str(REPO / "examples" / "quickstart.yaml")
    common = [f"training.max_steps={args.steps}", f"training.checkpoint_every={args.every}",
              f"training.log_every={args.every}", f"prompts.limit={args.prompts}"]
    roots = {arm: tempfile.mkdtemp(prefix=f"backpack-op-{arm}-") for arm in ("off_policy", "on_policy")}
    for root in roots.values():
        atexit.register(shutil.rmtree, root, True)
    # the on-policy arm's teacher runs beside the trainer: one replica, so both fit on a laptop's two cores
    cfgs = {arm: arm_config(config, root, arm, common + (["teachers.0.replicas=1"] if arm == "on_policy" else []))
            for arm, root in roots.items()}
    gen = generate(cfgs["off_policy"], reporter(t0, "generate: "))
    print(f"generate: {gen.ok_rows} answers, {gen.tokens} teacher tokens", flush=True)
    copy_dataset(cfgs["off_policy"], cfgs["on_policy"])
    teacher = HFTeacher(TeacherConfig(name="teacher", threads=2, batch_size=16))
    out = {}
    for arm, cfg in cfgs.items():
        t1 = time.perf_counter()
        res = train(cfg, reporter(t0, f"{arm}: "))
        seconds = time.perf_counter() - t1
        store = DatasetStore(str(cfg.dataset_dir), create=False)
        train_rows, held = split(store, cfg.eval.heldout_fraction)
        held = sorted(held, key=lambda r: r["query_id"])[: args.heldout]
        answers = [r["completion_tokens"] for r in train_rows.to_pylist() if r["status"] == "ok"]
        per_row = sum(answers) / max(1, len(answers))
        metrics = {m["step"]: m for m in _metrics(cfg)}
        with attach_redis(cfg) as url:
            metas = sorted(Registry(url, cfg.name, run_files(cfg)).versions(), key=lambda m: m["step"])
        curve = [{"step": 0, "tokens": 0, **reverse_kl_and_nll(cfg, None, held, teacher)}]
        for meta in metas:
            step = meta["step"]
            if arm == "off_policy":
                rows = min(len(answers), step * cfg.training.batch_size * cfg.training.num_workers)
                tokens = rows * per_row
            else:
                tokens = metrics.get(step, {}).get("scored_tokens", 0)
            curve.append({"step": step, "tokens": tokens, **reverse_kl_and_nll(cfg, meta, held, teacher)})
            print(f"  {arm} step {step}: reverse KL {curve[-1]['reverse_kl']:.4f}, NLL {curve[-1]['nll']:.4f}, "
                  f"{tokens:.0f} teacher tokens", flush=True)
        out[arm] = {"curve": curve, "train_s": seconds, "step": res["step"]}
    final = out["off_policy"]["curve"][-1]
    # as well on both: a per-token reverse KL alone is won by a student that writes (almost) nothing
    reached = next((p for p in out["on_policy"]["curve"][1:]
                    if p["reverse_kl"] <= final["reverse_kl"] and p["nll"] <= final["nll"]), None)
    ratio = final["tokens"] / reached["tokens"] if reached and reached["tokens"] else 0.0
    out["ratio"], out["reached"] = ratio, reached
    return out


def _metrics(cfg) -> list[dict]:
    import json

    path = cfg.run_dir / "train" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def facts(args, t0: float) -> dict:
    """Today's context distillation against on-policy context distillation on the shipped pack."""
    from backpack.eval.knowledge import evaluate_facts
    from backpack.run.generate import generate
    from backpack.run.train import train

    os.chdir(REPO)  # the shipped config's paths are relative to the repository
    config = str(REPO / "examples" / "mental.yaml")
    questions = str(REPO / "examples" / "mental" / "questions-48.jsonl")
    roots = {arm: tempfile.mkdtemp(prefix=f"backpack-opf-{arm}-") for arm in ("off_policy", "on_policy")}
    for root in roots.values():
        atexit.register(shutil.rmtree, root, True)
    extra = [f"training.max_steps={args.fact_steps}"] if args.fact_steps else []
    cfgs = {arm: arm_config(config, root, arm, extra + (["teachers.0.replicas=1"] if arm == "on_policy" else []))
            for arm, root in roots.items()}
    generate(cfgs["off_policy"], reporter(t0, "facts generate: "))
    copy_dataset(cfgs["off_policy"], cfgs["on_policy"])
    out = {}
    for arm, cfg in cfgs.items():
        t1 = time.perf_counter()
        train(cfg, reporter(t0, f"facts {arm}: "))
        seconds = time.perf_counter() - t1
        acc = {s["key"]: s["accuracy"] for s in evaluate_facts(cfg, questions, None, reporter(t0, "facts eval: "))
               ["settings"]}
        out[arm] = {"accuracy": acc["distilled"], "teacher": acc["teacher"], "train_s": seconds}
        print(f"  facts {arm}: distilled {acc['distilled']:.3f}, teacher with context {acc['teacher']:.3f}, "
              f"trained in {seconds:.0f} s", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["both", "quickstart", "facts"], default="both")
    ap.add_argument("--steps", type=int, default=40, help="quickstart: optimizer steps of each arm")
    ap.add_argument("--every", type=int, default=10, help="quickstart: steps between versions (each evaluated)")
    ap.add_argument("--prompts", type=int, default=120, help="quickstart: prompts the teacher answers")
    ap.add_argument("--heldout", type=int, default=16, help="quickstart: held-out prompts each version is scored on")
    ap.add_argument("--fact-steps", type=int, default=0, help="facts: optimizer steps (0: the shipped config's)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    q = quickstart(args, t0) if args.part in ("both", "quickstart") else None
    f = facts(args, t0) if args.part in ("both", "facts") else None
    print()
    if q:
        print("| arm | step | teacher tokens | held-out reverse KL | NLL of teacher answers |")
        print("|---|---|---|---|---|")
        for arm in ("off_policy", "on_policy"):
            for p in q[arm]["curve"]:
                print(f"| {arm} | {p['step']} | {p['tokens']:.0f} | {p['reverse_kl']:.4f} | {p['nll']:.4f} |")
        print(f"train wall time: off-policy {q['off_policy']['train_s']:.0f} s, on-policy "
              f"{q['on_policy']['train_s']:.0f} s")
        if q["reached"] is None:
            print("on-policy did not reach off-policy's final reverse KL and NLL in its steps: ratio 0")
    if f:
        print(f"facts: off-policy {f['off_policy']['accuracy']:.3f} ({f['off_policy']['train_s']:.0f} s of training), "
              f"on-policy {f['on_policy']['accuracy']:.3f} ({f['on_policy']['train_s']:.0f} s)")
    print(f"wall time: {time.perf_counter() - t0:.0f} s")
    nan = math.nan
    a = f["off_policy"]["accuracy"] if f else nan
    b = f["on_policy"]["accuracy"] if f else nan
    c = f["off_policy"]["teacher"] if f else nan
    print(f"on-policy: {q['ratio'] if q else nan:.2f}x fewer teacher tokens to off-policy's final score; "
          f"facts off-policy {a:.3f} on-policy {b:.3f} teacher-with-context {c:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
