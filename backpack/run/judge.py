"""`backpack eval CONFIG --judge TEACHER`: a teacher of the run grades the student versions' answers.

The versions are evaluated first (their greedy answers on the held-out prompts, cached like any evaluation);
then the judge, through the scheduler like any prompt (routing, retries, the ledger), compares each answer with
the teacher's answer to the same prompt in both orders, and scores it alone from 1 to 10 with the teacher's
answer as reference (backpack/eval/judge.py). Unreadable replies are asked once more with a reminder of the
format, then counted as unparsed. Every request and reply is a row of the run's `judge` dataset; the summary per
version goes to `eval/judge-<teacher>.json` and into the report.
"""

from __future__ import annotations

import json
from typing import Callable, Optional

from backpack.config import RunConfig
from backpack.core.schema import queries_to_table
from backpack.core.types import OK, DecodingParams, Query
from backpack.data.storage import run_files
from backpack.data.store import DatasetStore
from backpack.errors import InputError
from backpack.eval.judge import (aggregate_pairwise, order_points, pairwise_messages, parse_rubric, parse_verdict,
                                 reask_messages, rubric_messages)
from backpack.run.evaluate import evaluate, heldout_rows
from backpack.run.generation import Generation, wait_with_progress
from backpack.runtime.progress import RedisProgress, Reporter
from backpack.runtime.session import RunSession

JUDGE_TASK = "judge"
JUDGE_DECODING = DecodingParams(max_new_tokens=96)  # greedy: the same question gets the same verdict


def judge_teacher(cfg: RunConfig, name: str):
    """The judge's teacher config; InputError when it is not a teacher of the run or is the student itself."""
    by_name = {t.name: t for t in cfg.teachers}
    if name not in by_name:
        raise InputError(f"--judge {name!r} is not a teacher of run {cfg.name!r} (its teachers: "
                         f"{', '.join(by_name)})")
    t = by_name[name]
    if t.backend != "openai" and str(t.model).startswith(str(cfg.run_dir / "students")):
        raise InputError(f"--judge {name!r} is the run's own student (its model is a student version): a model "
                         "cannot judge its own answers; judge with a teacher")
    return t


def judge(cfg: RunConfig, name: str, versions: Optional[list[int]] = None,
          reporter: Optional[Reporter] = None) -> dict:
    """Judge the versions (all, or `versions`, and version 0) with teacher `name`; returns {version: summary}."""
    teacher = judge_teacher(cfg, name)
    rep = reporter or Reporter()
    report = evaluate(cfg, versions, rep)
    store = DatasetStore(str(cfg.dataset_dir), create=False)
    held = [r for r in heldout_rows(cfg, store) if r["status"] == OK]
    # query id -> every (version, kind, row index, student first?) it answers: identical answers make the two
    # orders (or two versions) one and the same request, asked once
    asks: dict[str, list[tuple]] = {}
    queries: list[Query] = []
    for e in report["versions"]:
        answers = e.get("answers") or {}
        for i, r in enumerate(held):
            question, ours, theirs = r["messages"][-1]["content"], answers.get(r["query_id"], ""), r["text"] or ""
            for kind, first, messages in (("pairwise", True, pairwise_messages(question, ours, theirs)),
                                          ("pairwise", False, pairwise_messages(question, theirs, ours)),
                                          ("rubric", None, rubric_messages(question, ours, theirs))):
                q = Query(messages=messages, decoding=JUDGE_DECODING, task=JUDGE_TASK, teacher=name)
                if q.id not in asks:
                    asks[q.id] = []
                    queries.append(q)
                asks[q.id].append((e["version"], kind, i, first))
    one_teacher = cfg.model_copy(update={"teachers": [teacher], "mental": None})
    files = run_files(cfg)
    rows = DatasetStore(files.uri("judge"))
    with RunSession(one_teacher, rep) as session:
        asker = Asker(session, rows)
        parsed, reasked = asker.read(queries, {q.id: asks[q.id][0][1] for q in queries}, name)
    summary = _summarise(report["versions"], held, queries, asks, parsed, reasked)
    files.write_text(f"eval/judge-{name}.json", json.dumps(summary))
    evaluate(cfg, versions, rep)  # the report again, now with the judge's section (evaluations are cached)
    return summary


class Asker:
    """The judge's replies through the scheduler, stored as rows of `rows`. The teachers are started at the first
    request not stored (by `start`, when the caller has them started already)."""

    def __init__(self, session: RunSession, rows: DatasetStore, start: Optional[Callable[[], Generation]] = None):
        self.session, self.rows, self.gen, self.start = session, rows, None, start

    def _generation(self) -> Generation:
        if self.gen is None:
            self.gen = self.start() if self.start is not None else Generation.started(self.session)
        return self.gen

    def read(self, queries: list[Query], kinds: dict[str, str], judge: str) -> tuple[dict, int]:
        """({query id: its verdict or (score, reason), None when unreadable}, how many were asked again): each
        unreadable reply is asked once more with a reminder of its format (`kinds[id]`: pairwise or rubric)."""
        replies = self.ask(queries)
        parsed, again = {}, []
        for q in queries:
            value = _parse(kinds[q.id], replies.get(q.id))
            if value is None:
                again.append((q.id, Query(messages=reask_messages(q.messages, replies.get(q.id) or "", kinds[q.id]),
                                          decoding=q.decoding, task=q.task, teacher=judge)))
            parsed[q.id] = value
        if again:
            self.session.rep.stage(f"asking the judge again for {len(again)} reply(ies) it could not read")
            second = self.ask([r for _, r in again])
            for qid, retry in again:
                parsed[qid] = _parse(kinds[qid], second.get(retry.id))
        return parsed, len(again)

    def ask(self, queries: list[Query]) -> dict:
        """{query id: the judge's reply} for each of `queries` answered (stored ones reused; failed ones left out)."""
        stored = self.rows.query_status()
        todo = [q for q in queries if stored.get(q.id) != OK]
        if todo:
            gen = self._generation()
            progress = RedisProgress(self.session.redis_url, self.session.cfg.name)
            progress.start(total=len(todo))
            self.session.rep.stage(f"the judge reads {len(todo)} request(s)")
            try:
                wait_with_progress(gen.spawn_scheduler(self.rows, progress).run.remote(queries_to_table(todo)),
                                   progress, self.session.rep)
            finally:
                progress.finish()
        wanted = {q.id for q in queries}
        if not self.rows.version:
            return {}
        return {r["query_id"]: r["text"] for r in self.rows.read(columns=["query_id", "status", "text"]).to_pylist()
                if r["query_id"] in wanted and r["status"] == OK}


def _parse(kind: str, text: Optional[str]):
    if text is None:
        return None
    return parse_verdict(text) if kind == "pairwise" else parse_rubric(text)


def _summarise(evals: list[dict], held: list[dict], queries: list[Query], asks: dict, parsed: dict,
               reasked: int) -> dict:
    out = {}
    for e in evals:
        v = e["version"]
        first, second = [None] * len(held), [None] * len(held)
        scores, unparsed, by_row = [], 0, [None] * len(held)
        for q in queries:
            for version, kind, i, student_first in asks[q.id]:
                if version != v:
                    continue
                value = parsed.get(q.id)
                if kind == "pairwise":
                    (first if student_first else second)[i] = value
                elif value is None:
                    unparsed += 1
                else:
                    scores.append({"prompt": held[i]["messages"][-1]["content"], "score": value[0],
                                   "reason": value[1]})
                    by_row[i] = value[0]
        mean = sum(s["score"] for s in scores) / len(scores) if scores else float("nan")
        # per prompt, so that `synthesis.source: failures` finds where the student is weakest
        per_prompt = [{"id": r["query_id"], "task": r["task"], "prompt": r["messages"][-1]["content"],
                       "points": None if pair is None else sum(pair) / 2, "score": by_row[i]}
                      for i, (r, pair) in enumerate(zip(held, order_points(first, second)))]
        out[str(v)] = {"pairwise": aggregate_pairwise(first, second).as_dict(),
                       "rubric": {"mean": mean, "judged": len(scores), "unparsed": unparsed, "scores": scores[:5]},
                       "prompts": len(held), "reasked": reasked, "per_prompt": per_prompt}
    return out


def format_judged(name: str, summary: dict) -> str:
    """The judge's table as `backpack eval --judge` prints it."""
    lines = [f"judged by {name}: win rate against the teacher (both orders; tie 0.5) and a 1-10 score",
             "version | win rate ± 95% | wins/ties/losses | inconsistent | score | unparsed"]
    for v, j in sorted(summary.items(), key=lambda kv: int(kv[0])):
        p, r = j["pairwise"], j["rubric"]
        lines.append(f"{v} | {p['win_rate']:.3f} ± {p['ci95']:.3f} | {p['wins']}/{p['ties']}/{p['losses']} | "
                     f"{p['inconsistent']} | {r['mean']:.2f} | {p['unparsed'] + r['unparsed']}")
    return "\n".join(lines)
