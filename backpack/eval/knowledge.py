"""`backpack eval CONFIG --questions FILE`: fact accuracy of four settings side by side.

1. base student, no context      what the student knows before distillation
2. teacher with context          the first teacher, answering with recall in front of the question
3. distilled student, no context what context distillation taught the student (the goal)
4. distilled student with recall a retrieval-augmented student, for comparison

Every setting answers the same questions greedily with the same generation code the teachers use; answers are
scored by `facts.score`. `recovered` is setting 3 over setting 2: the share of the teacher-with-context
accuracy the student carries without the context.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from backpack.config import RunConfig
from backpack.core.types import DecodingParams, Query
from backpack.errors import InputError
from backpack.eval.facts import Question, load_questions, score

SETTINGS = (
    ("base", "base student, no context"),
    ("teacher", "teacher with context"),
    ("distilled", "distilled student, no context"),
    ("distilled_recall", "distilled student with recall"),
)


def _answers(gen, questions: list[Question], contexts: Optional[dict], max_new_tokens: int) -> list[str]:
    greedy = DecodingParams(max_new_tokens=max_new_tokens)
    queries = [Query(messages=[{"role": "user", "content": q.question}], decoding=greedy, task=q.task, id=q.id,
                     context=(contexts or {}).get(q.id)) for q in questions]
    by_id = {c.query_id: c for c in gen.answer(queries)}
    return [by_id[q.id].text or "" for q in questions]


def evaluate_facts(cfg: RunConfig, questions_path: str, version: Optional[int] = None, reporter=None) -> dict:
    """Score the four settings on `questions_path`; writes `<run>/eval/facts-<file stem>.json`."""
    import torch

    from backpack.data.storage import run_files
    from backpack.mental.setup import prepare_recall
    from backpack.runtime.progress import Reporter
    from backpack.runtime.session import attach_redis
    from backpack.student.registry import Registry, load_version
    from backpack.teachers.hf import HFTeacher
    from backpack.teachers.host import build_teacher

    cfg.require("student")
    if cfg.mental is None:
        raise InputError("evaluating fact accuracy needs the config's mental: section (the knowledge the teacher "
                         "recalls)")
    rep, files = reporter or Reporter(), run_files(cfg)
    max_new, batch = cfg.eval.max_new_tokens, cfg.eval.batch_size
    questions = load_questions(questions_path, cfg.prompts.default_task)
    t0 = time.perf_counter()
    with attach_redis(cfg) as url:
        recaller = prepare_recall(cfg, url, None, rep.stage)
        known = recaller.store.tasks()
        missing = sorted({q.task for q in questions} - set(known))
        if missing:
            raise InputError(f"questions name task(s) {missing} that have no knowledge (the store has "
                             f"{sorted(known)})")
        recalled = {q.id: recaller.recall(q.task, q.question, known) for q in questions}
        metas = {m["version"]: m for m in Registry(url, cfg.name, files).versions()}
    contexts = {qid: r.context for qid, (r, _) in recalled.items()}
    if version is None:
        version = max(metas) if metas else None
    elif version != 0 and version not in metas:
        raise InputError(f"no student version {version} in run {cfg.name!r} (it has {sorted(metas) or 'none'})")

    torch.set_num_threads(os.cpu_count() or 1)
    answers: dict[str, list[str]] = {}

    def run(key: str, gen, ctx) -> None:
        rep.stage(f"answering {len(questions)} question(s): {dict(SETTINGS)[key]}")
        answers[key] = _answers(gen, questions, ctx, max_new)

    base = load_version(None, cfg.student, merge=True)
    run("base", HFTeacher.from_model("base", base.model, base.tokenizer, fingerprint="base", batch_size=batch), None)
    del base
    teacher = build_teacher(cfg.teachers[0].model_copy(update={"batch_size": batch,
                                                                "threads": os.cpu_count() or 1}))
    run("teacher", teacher, contexts)
    del teacher
    if version:
        ap = load_version(metas[version], cfg.student, merge=True)
        gen = HFTeacher.from_model("distilled", ap.model, ap.tokenizer, fingerprint=f"v{version}", batch_size=batch)
        run("distilled", gen, None)
        run("distilled_recall", gen, contexts)
    else:
        rep.stage("no trained student version yet: train first (`backpack run` or `backpack train`) to score the "
                  "distilled settings")

    acc = {k: sum(score(a, q.facts) for a, q in zip(v, questions)) / len(questions) for k, v in answers.items()}
    labelled = [q for q in questions if q.passage]
    out = {
        "questions": len(questions), "file": str(questions_path), "student_version": version,
        "teacher": cfg.teachers[0].name, "knowledge_versions": known,
        "settings": [{"key": k, "setting": name, "accuracy": acc.get(k)} for k, name in SETTINGS],
        "recovered": (acc["distilled"] / acc["teacher"]) if acc.get("teacher") and "distilled" in acc else None,
        # how often recall brought the passage that answers the question (when the file labels it)
        "recall_hit_rate": (sum(q.passage in recalled[q.id][0].passage_ids for q in labelled) / len(labelled)
                            if labelled else None),
        "seconds": time.perf_counter() - t0,
        "answers": [{"id": q.id, "task": q.task, "question": q.question, "facts": [list(f) for f in q.facts],
                     "recalled": recalled[q.id][0].ids,
                     **{k: v[i] for k, v in answers.items()}} for i, q in enumerate(questions)],
    }
    rel = f"eval/facts-{Path(questions_path).stem}.json"
    files.write_text(rel, json.dumps(out, indent=1, ensure_ascii=False))
    out["path"] = files.uri(rel)
    return out


def format_facts(out: dict) -> str:
    """The four settings as a table, then the recovered share."""
    lines = [f"fact accuracy on {out['questions']} question(s) ({out['file']}), student version "
             f"{out['student_version'] if out['student_version'] is not None else '(none)'}:",
             f"  {'setting':<32} accuracy"]
    for s in out["settings"]:
        acc = "-" if s["accuracy"] is None else f"{s['accuracy']:.3f}"
        lines.append(f"  {s['setting']:<32} {acc}")
    if out["recovered"] is not None:
        lines.append(f"  the distilled student recovers {out['recovered']:.0%} of the teacher-with-context accuracy")
    if out["recall_hit_rate"] is not None:
        lines.append(f"  recall brought the labelled passage for {out['recall_hit_rate']:.0%} of the questions")
    return "\n".join(lines)
