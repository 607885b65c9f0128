"""`backpack synthesize`: the teachers write new prompts, curation keeps the good ones.

The requests come from the run's seed tasks (Self-Instruct, backpack/synthesis/self_instruct.py, with a share
of Evol-Instruct rewrites of kept prompts, backpack/synthesis/evol.py) or from a knowledge pack (questions each
passage answers, backpack/synthesis/from_pack.py). Rounds of them go through the scheduler like any prompt, so
routing, retries, the ledger and accounting apply, and every reply is stored in the run's `synthesis/replies`
dataset (a rerun sends only what is not stored: it resumes). After each round every candidate so far is
curated (backpack/data/curation.py); rounds stop when `target` prompts are kept.

Each run writes a new version `synthesis/v<N>/`: `prompts.parquet` (the prompt-file columns id, task, prompt,
plus provenance: source, seed_ids, evolved_from, written_by, round, reply_id), `rejected.parquet` (every
removed candidate, its reason and the prompt it duplicates) and `funnel.json`. `prompts.path: synthesized` reads the latest one.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from backpack.config import SYNTHESIZED, RunConfig
from backpack.config.knowledge import load_pack
from backpack.core.schema import queries_to_table
from backpack.core.types import OK, DecodingParams, Query
from backpack.data.curation import FILTERS, Filters, clean, curate, funnel_lines, trim_question
from backpack.data.prompts import read_prompts
from backpack.data.storage import RunFiles, run_files
from backpack.data.store import DatasetStore
from backpack.errors import InputError
from backpack.eval.facts import load_questions
from backpack.eval.judge import prompt_rubric_messages
from backpack.eval.weakest import facts_weak, judged_weak
from backpack.eval.weakest import latest_version as latest_judged
from backpack.eval.weakest import weakest
from backpack.run.evaluate import judged_of
from backpack.run.generation import Generation, wait_with_progress
from backpack.run.judge import JUDGE_DECODING, JUDGE_TASK, Asker
from backpack.runtime.progress import RedisProgress, Reporter
from backpack.runtime.session import RunSession
from backpack.synthesis.evol import build_evol_requests, parse_rewrite
from backpack.synthesis.from_pack import build_pack_requests, example_questions, pack_items
from backpack.synthesis.self_instruct import (FAILURES_INSTRUCTION, INSTRUCTION, Request, Seed, build_requests,
                                              parse_reply)

REQUEST_TASK = "synthesize"
PROMPT_SCHEMA = pa.schema([("id", pa.string()), ("task", pa.string()), ("prompt", pa.string()),
                           ("source", pa.string()), ("seed_ids", pa.list_(pa.string())),
                           ("evolved_from", pa.string()), ("written_by", pa.string()), ("round", pa.int32()),
                           ("reply_id", pa.string())])
REJECTED_SCHEMA = pa.schema([("text", pa.string()), ("reason", pa.string()), ("duplicate_of", pa.string()),
                             ("written_by", pa.string()), ("round", pa.int32()), ("reply_id", pa.string())])


@dataclass
class SynthesisResult:
    version: int
    path: str                          # the kept prompts' Parquet file
    kept: int
    generated: int
    funnel: list = field(default_factory=list)
    rounds: int = 0
    requests: int = 0
    failed_requests: int = 0
    tokens: int = 0                    # teacher tokens written for the replies of this run's requests
    seconds: float = 0.0

    def lines(self, target: int) -> list[str]:
        """What `backpack synthesize` prints: the funnel, then the set and what it cost."""
        out = funnel_lines(self.funnel)
        out.append(f"synthesized prompt set v{self.version} at {self.path}: kept {self.kept} of {self.generated} "
                   f"candidate(s) from {self.requests} request(s) ({self.failed_requests} failed) in {self.rounds} "
                   f"round(s), {self.tokens} teacher tokens, {self.seconds:.1f} s")
        if self.kept < target:
            out.append(f"fewer than the target of {target}: raise synthesis.rounds (or requests_per_round) and "
                       "run again (the stored replies are reused)")
        out.append(f"use it with prompts.path: synthesized; what was removed: backpack data show "
                   f"{self.path.rsplit('/', 1)[0]}")
        return out


def synthesis_files(cfg: RunConfig) -> RunFiles:
    return run_files(cfg).sub("synthesis")


def latest_version(files: RunFiles) -> int:
    versions = [int(p.split("/")[0][1:]) for p in files.glob("", "/funnel.json") if p.split("/")[0][1:].isdigit()]
    return max(versions, default=0)


def synthesized_prompts(cfg: RunConfig) -> str:
    """The local path of the run's latest synthesized prompt set (`prompts.path: synthesized`), downloaded into
    the run folder when the run's files are in an object store."""
    files = synthesis_files(cfg)
    version = latest_version(files)
    if not version:
        raise InputError(f"prompts.path is {SYNTHESIZED!r} but run {cfg.name!r} has no synthesized prompts yet: "
                         "run `backpack synthesize` with this config first")
    rel = f"v{version}/prompts.parquet"
    if files.local:
        return files.path(rel)
    local = cfg.run_dir / "synthesis" / rel
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(files.read_bytes(rel))
    return str(local)


def prompt_file(cfg: RunConfig) -> str:
    """The run's prompt file: prompts.path, or the latest synthesized set where it says `synthesized`."""
    return synthesized_prompts(cfg) if cfg.prompts.path == SYNTHESIZED else cfg.prompts.path


def read_seeds(path: str, limit: Optional[int]) -> list[Seed]:
    """The seed tasks: every record must be usable (a seed file is small and hand-written: a bad record is an
    error naming it, not a failed row)."""
    queries, rejected = read_prompts(path, DecodingParams(), "default", limit)
    if rejected:
        raise InputError(f"seed file {path!r}: {rejected[0].reason}"
                         + (f" (and {len(rejected) - 1} more bad record(s))" if len(rejected) > 1 else ""))
    return [Seed(q.id, q.task, q.messages[-1]["content"]) for q in queries]


def _heldout_texts(path: Optional[str]) -> list[str]:
    """The held-out prompts: a prompt file, or a questions file (`backpack eval --questions`)."""
    if not path:
        return []
    queries, rejected = read_prompts(path, DecodingParams(), "default")
    if rejected and not queries:
        return [q.question for q in load_questions(path)]
    return [q.messages[-1]["content"] for q in queries]


def failure_seeds(cfg: RunConfig) -> list[Seed]:
    """The prompts a student version did worst on (`synthesis.failures_version`, or the newest judged or
    fact-scored one), from the run's stored judge and fact evaluations, worst first."""
    files, syn = run_files(cfg), cfg.synthesis
    judged = judged_of(files).get("judge", {})
    facts = [json.loads(files.read_text(p)) for p in files.glob("eval", ".json")
             if p.rsplit("/", 1)[-1].startswith("facts-")]
    version = syn.failures_version if syn.failures_version is not None else latest_judged(judged, facts)
    if version is None:
        raise InputError(f"synthesis.source is failures but run {cfg.name!r} has no judged or fact-scored student "
                         "version: run `backpack eval CONFIG --judge TEACHER` or `backpack eval CONFIG --questions "
                         "FILE` first")
    weak = [w for name, summary in judged.items() if str(version) in summary
            for w in judged_weak(summary[str(version)], name)]
    weak += [w for f in facts if f.get("student_version") == version for w in facts_weak(f)]
    chosen = weakest(weak, syn.failures_count)
    if not chosen:
        raise InputError(f"version {version} of run {cfg.name!r} has no judged or fact-scored prompt it did badly "
                         "on (it won every comparison and gave every fact, or was judged on none): nothing to "
                         "practise")
    return [Seed(w.id, w.task, w.prompt) for w in chosen]


class _Source:
    """Where a run's requests come from: `examples` are the texts a candidate must not copy (seeds, or the
    pack's own questions); `requests(round, kept)` a round's requests; `candidates(request, reply)` the candidate
    prompts of a reply."""

    def __init__(self, cfg: RunConfig):
        syn = cfg.synthesis
        self.syn = syn
        if syn.source == "seeds":
            self.seeds = read_seeds(syn.seeds, syn.seed_limit)
            self.examples = [s.text for s in self.seeds]
        elif syn.source == "failures":
            self.seeds = failure_seeds(cfg)
            self.examples = [s.text for s in self.seeds]
        else:
            path = syn.pack or cfg.mental.path
            pack = load_pack(path)
            self.items = pack_items(pack)
            if not self.items:
                raise InputError(f"knowledge pack {path!r} has no passage or experience to write questions about")
            self.examples = example_questions(pack)

    @property
    def on_topic(self) -> bool:
        """A pack's questions must be about the passages their request showed (curation's topic filter)."""
        return self.syn.source == "pack"

    def candidates(self, request: Request, reply: str) -> list[str]:
        """A reply's candidate prompts: a rewrite's one prompt; a pack's questions without the answers a small
        teacher writes after them; Self-Instruct's numbered items."""
        if request.parent:
            return parse_rewrite(reply)
        if self.syn.source == "pack":
            return [trim_question(clean(text)) for text in parse_reply(reply)]
        return parse_reply(reply)

    def requests(self, round_: int, kept: list[tuple[str, str]]) -> list[Request]:
        """Round `round_`'s requests given the (prompt, task) pairs kept so far; `evolve_fraction` of them
        rewrite a kept prompt once there are kept prompts."""
        syn = self.syn
        if syn.source == "pack":
            return build_pack_requests(round_, syn.requests_per_round, self.items, self.examples, syn.per_request,
                                       syn.seed)
        evolve = min(len(kept), round(syn.requests_per_round * syn.evolve_fraction))
        new = build_requests(round_, syn.requests_per_round - evolve, self.seeds, [t for t, _ in kept],
                             syn.per_request, syn.seeds_shown, syn.generated_shown, syn.seed,
                             FAILURES_INSTRUCTION if syn.source == "failures" else INSTRUCTION)
        return new + build_evol_requests(round_, len(new), evolve, kept, syn.evolutions, syn.seed)


def synthesize(cfg: RunConfig, reporter: Optional[Reporter] = None) -> SynthesisResult:
    """Synthesize `cfg.synthesis.target` prompts (see the module docstring); one run of a name at a time."""
    syn = cfg.synthesis
    if syn is None:
        raise InputError(f"run {cfg.name!r} has no synthesis: section (see examples/synthesize.yaml)")
    rep = reporter or Reporter()
    t0 = time.perf_counter()
    source = _Source(cfg)
    heldout = _heldout_texts(syn.heldout)
    seed_texts = source.examples
    filters = Filters(syn.filters.min_chars, syn.filters.max_chars, syn.filters.near_threshold,
                      syn.filters.min_judge_score)
    decoding = DecodingParams(max_new_tokens=syn.max_new_tokens, temperature=syn.temperature, top_p=syn.top_p)
    result = SynthesisResult(0, "", 0, 0)
    with RunSession(cfg, rep) as session:
        replies = DatasetStore(synthesis_files(cfg).uri("replies"))
        started: list[Generation] = []

        def generation() -> Generation:  # the teachers start at the first request that is not stored
            if not started:
                started.append(Generation.started(session))
            return started[0]

        judge = _PromptJudge(session, synthesis_files(cfg), syn.judge, generation) if syn.judge else None
        candidates: list[dict] = []
        curated = curate([], seed_texts, heldout, filters)
        for round_ in range(1, syn.rounds + 1):
            kept = [(text, candidates[i]["task"]) for i, text in zip(curated.kept, curated.texts)]
            requests = source.requests(round_, kept)
            queries = [Query(messages=r.messages, task=REQUEST_TASK, teacher=syn.teacher,
                             decoding=DecodingParams(**{**vars(decoding), "seed": syn.seed * 100_003 + round_ * 4099
                                                        + r.index})) for r in requests]
            stored = replies.query_status()
            todo = [q for q in queries if stored.get(q.id) != OK]
            if todo:
                rep.stage(f"round {round_}: {len(todo)} request(s) to the teachers "
                          f"({len(curated.texts)}/{syn.target} kept so far)")
                _send(session, generation(), replies, todo)
            columns = ["query_id", "status", "text", "teacher", "completion_tokens"]
            rows = {r["query_id"]: r for r in replies.read(columns=columns).to_pylist()} if replies.version else {}
            for q, r in zip(queries, requests):
                row = rows.get(q.id)
                result.requests += 1
                if row is None or row["status"] != OK:
                    result.failed_requests += 1
                    continue
                result.tokens += row["completion_tokens"] or 0
                for text in source.candidates(r, row["text"]):
                    candidates.append({"text": text, "task": r.task, "seed_ids": r.seed_ids, "about": r.about,
                                       "evolved_from": r.parent or None, "evolution": r.evolution or None,
                                       "written_by": row["teacher"], "round": round_, "reply_id": q.id})
            texts = [c["text"] for c in candidates]
            references = [c["about"] for c in candidates] if source.on_topic else None
            while True:  # the judge scores the candidates that pass every other filter, then they are curated again
                scores = [judge.scores.get(clean(t)) for t in texts] if judge else None
                curated = curate(texts, seed_texts, heldout, filters, scores, references)
                if judge is None or not judge.score([clean(texts[i]) for i in curated.unjudged]):
                    break
            result.rounds = round_
            if len(curated.texts) >= syn.target:
                break
        result = _write(cfg, candidates, curated, result)
    result.seconds = time.perf_counter() - t0
    return result


class _PromptJudge:
    """A teacher's 1-10 scores of candidate prompts (curation's judge filter), asked through the scheduler and
    stored as rows of the run's `synthesis/judged` dataset, each unreadable reply asked once more."""

    def __init__(self, session: RunSession, files: RunFiles, teacher: str, generation: Callable[[], Generation]):
        self.teacher, self.scores = teacher, {}
        self.asker = Asker(session, DatasetStore(files.uri("judged")), generation)
        self.asked: set[str] = set()

    def score(self, prompts: list[str]) -> bool:
        """Scores `prompts` not asked before; False when there were none (nothing new to curate with)."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self.asked]
        if not todo:
            return False
        queries = [Query(messages=prompt_rubric_messages(p), decoding=JUDGE_DECODING, task=JUDGE_TASK,
                         teacher=self.teacher) for p in todo]
        parsed, _ = self.asker.read(queries, {q.id: "rubric" for q in queries}, self.teacher)
        for p, q in zip(todo, queries):
            self.asked.add(p)
            value = parsed.get(q.id)
            self.scores[p] = value[0] if value else None
        return True


def _send(session: RunSession, gen: Generation, store: DatasetStore, todo: list[Query]) -> None:
    progress = RedisProgress(session.redis_url, session.cfg.name)
    progress.start(total=len(todo))
    scheduler = gen.spawn_scheduler(store, progress)
    try:
        wait_with_progress(scheduler.run.remote(queries_to_table(todo)), progress, session.rep)
    finally:
        progress.finish()
        gen.record_counters()


def _write(cfg: RunConfig, candidates: list[dict], curated, result: SynthesisResult) -> SynthesisResult:
    """A new version: the kept prompts (the first `target`; the rest are rejected as over the target), the
    rejected ones and the funnel."""
    files, target = synthesis_files(cfg), cfg.synthesis.target
    version = latest_version(files) + 1
    kept_rows, rejected_rows = [], []
    for n, (i, text) in enumerate(zip(curated.kept, curated.texts)):
        c = candidates[i]
        if n >= target:
            rejected_rows.append({"text": text, "reason": "target", "duplicate_of": None, **_origin(c)})
            continue
        qid = Query(messages=[{"role": "user", "content": text}], task=c["task"]).id
        kept_rows.append({"id": qid, "task": c["task"], "prompt": text,
                          "source": f"evol:{c['evolution']}" if c["evolution"] else cfg.synthesis.source,
                          "seed_ids": c["seed_ids"], "evolved_from": c["evolved_from"], **_origin(c)})
    for r in curated.rejected:
        rejected_rows.append({"text": r.text, "reason": r.reason, "duplicate_of": r.duplicate_of,
                              **_origin(candidates[r.index])})
    funnel = list(curated.funnel) + ([("target", len(kept_rows))] if len(curated.texts) > target else [])
    for name, rows, schema in (("prompts", kept_rows, PROMPT_SCHEMA), ("rejected", rejected_rows, REJECTED_SCHEMA)):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
        files.write_bytes(f"v{version}/{name}.parquet", buf.getvalue())
    files.write_text(f"v{version}/funnel.json", json.dumps({
        "funnel": funnel, "filters": list(FILTERS), "requests": result.requests,
        "failed_requests": result.failed_requests, "teacher_tokens": result.tokens, "rounds": result.rounds}))
    result.version, result.path = version, files.uri(f"v{version}/prompts.parquet")
    result.kept, result.generated, result.funnel = len(kept_rows), len(candidates), funnel
    return result


def _origin(c: dict) -> dict:
    return {"written_by": c["written_by"], "round": c["round"], "reply_id": c["reply_id"]}
