"""On-policy distillation inside a Ray Train worker: the student writes, the teachers score, the student learns
from its own samples (Agarwal et al.'s GKD; on-policy distillation).

Each on-policy step the worker's student samples answers to a batch of the run's prompts (batched decoding, the
`training.on_policy` sampling settings) and sends them to a scheduler actor as Queries to score: the prompt as
the teacher saw it when it answered (its recalled context included: the teacher scores with knowledge the
student writes without, which is on-policy context distillation), the sample as `score_ids`. The scheduler
routes, retries and stores the scores in the run's on-policy dataset (same schema; `student_version` is the
step of the student that wrote them), and the worker trains on what came back (`step.on_policy_loss`).

Sampling of batch t+1 overlaps the teachers' scoring of it with the update on batch t (one step off-policy, as
verl's async mode), so teachers and trainer are both busy. The samples waiting to be trained on go into every
checkpoint, and a resumed worker reads the scores already stored instead of asking for them again.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict
from typing import Optional

from backpack.core.types import OK, STOP, DecodingParams, Query
from backpack.teachers.accounting import LEDGER_REPLICA

log = logging.getLogger(__name__)
ON_POLICY_DATASET = "on_policy"  # the run's scored samples (the dataset's schema), under the run's files


def sample_queries(writer, rows: list[dict], oc, top_k: int, step: int, seed: int) -> list[Query]:
    """The student's (`writer`, an HFTeacher over its model) samples of the prompts of `rows`, as Queries for a
    teacher to score with its top `top_k`. A sample that stopped keeps its stop token, which is scored too."""
    import torch

    prompts, seen = [], set()
    for r in rows:
        if r["status"] == OK and r["query_id"] not in seen:
            seen.add(r["query_id"])
            prompts.append(r)
    decoding = DecodingParams(max_new_tokens=oc.max_new_tokens, temperature=oc.temperature, top_p=oc.top_p)
    asked = [Query(messages=r["messages"], task=r["task"], decoding=decoding) for r in prompts]
    torch.manual_seed(seed * 1_000_003 + step)  # (the decode loop draws from torch's global generator)
    was_training = writer.model.training
    writer.model.eval()  # no dropout while it writes
    try:
        written = writer.answer(asked)
    finally:
        writer.model.train(was_training)
    eos = writer.tokenizer.eos_token_id
    out = []
    for r, c in zip(prompts, written):
        ids = list(c.token_ids) + ([eos] if c.finish_reason == STOP and eos is not None else [])
        if ids:
            out.append(Query(messages=r["messages"], task=r["task"], context=r.get("context"),
                             recalled_ids=list(r.get("recalled_ids") or []),
                             knowledge_version=r.get("knowledge_version"), teacher=r.get("requested_teacher"),
                             decoding=DecodingParams(logprobs=top_k), score_ids=ids, student_version=step))
    return out


def query_from_dict(d: dict) -> Query:
    return Query(**{**d, "decoding": DecodingParams(**d["decoding"])})


class OnPolicyWorker:
    """A worker's on-policy half: its scheduler, the run's on-policy dataset, the batch being scored."""

    def __init__(self, session, config: dict):
        from backpack.data.store import DatasetStore
        from backpack.teachers.hf import HFTeacher

        op = config["on_policy"]
        self.session, self.oc = session, session.tc.on_policy
        self.scheduler = op["schedulers"][session.rank % len(op["schedulers"])]
        self.store = DatasetStore(op["store"])
        student = session.student
        self.writer = HFTeacher.from_model("student", student.model, student.tokenizer, student.base.fingerprint,
                                           batch_size=session.tc.batch_size)
        student.model.train()  # (the writer put it in eval mode; it is put there only while it samples)
        self.rng = random.Random(session.tc.seed)
        # scores already stored (a resumed worker asks the teachers only for what is not there)
        self.scored: dict[str, dict] = {}
        self._add(self.store.read().to_pylist())
        # (Queries, the on-policy dataset's version when they were sent, the scheduler's answer): in flight
        self.pending: Optional[tuple[list[Query], Optional[int], object]] = None
        # only rank 0 writes checkpoints: the other ranks' batches in flight are sampled again
        restored = (session.state or {}).get("on_policy_pending") if session.rank == 0 else None
        if restored:
            self.pending = ([query_from_dict(d) for d in restored], None, None)
        self.counts = {"on_policy_batches": 0, "off_policy_batches": 0, "scored_samples": 0, "scored_tokens": 0,
                       "failed_scores": 0, "reused_scores": 0}
        for key in self.counts:
            self.counts[key] = int((session.state or {}).get(key, 0))

    def _add(self, rows: list[dict]) -> None:
        for r in rows:
            if r.get("score_ids") is not None and (r["status"] == OK or r["query_id"] not in self.scored):
                self.scored[r["query_id"]] = r

    def on_policy_now(self, objective: str) -> bool:
        """Whether this optimizer step trains on-policy: always, never, or with probability lambda (mixed)."""
        if objective == "on_policy":
            return True
        return objective == "mixed" and self.rng.random() < self.oc.lambda_

    def _submit(self, queries: list[Query]) -> tuple[list[Query], int, object]:
        from backpack.core.schema import queries_to_table

        todo = [q for q in queries if self.scored.get(q.id, {}).get("status") != OK]
        self.counts["reused_scores"] += len(queries) - len(todo)
        version = self.store.version
        ref = self.scheduler.run.remote(queries_to_table(todo)) if todo else None
        return queries, version, ref

    def _collect(self, pending) -> list[dict]:
        import ray

        queries, version, ref = pending
        if version is None:  # restored from a checkpoint: the stored scores are reused, the rest asked for
            queries, version, ref = self._submit(queries)
        if ref is not None:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:  # its scheduler is gone (the driver starts new ones): not scored
                log.warning("on-policy: %d samples not scored (%s); this step trains on what is stored",
                            len(queries), str(e).splitlines()[0][:200])
            ids = {q.id for q in queries}
            new = [r for r in self.store.read_since(version).to_pylist() if r["query_id"] in ids]
            # tokens a teacher scored now (the ledger's answers cost nothing)
            self.counts["scored_tokens"] += sum(len(r["score_ids"]) for r in new
                                                if r["status"] == OK and r["replica"] != LEDGER_REPLICA)
            self._add(new)
        rows = [self.scored[q.id] for q in queries if q.id in self.scored]
        ok = [r for r in rows if r["status"] == OK]
        self.counts["failed_scores"] += len(queries) - len(ok)
        self.counts["scored_samples"] += len(ok)
        return ok

    def _sample(self, rows: list[dict], step: int, again: bool = False) -> list[Query]:
        tc = self.session.tc
        # seeded by the step: a resumed worker samples what it sampled before at that step, with the same
        # weights, so those samples' stored scores are reused
        return sample_queries(self.writer, rows, self.oc, tc.top_k, step, tc.seed * 2 + int(again))

    def next_batch(self, rows: list[dict], step: int) -> list[dict]:
        """Sample the prompts of `rows` with the student as it is and send them to be scored; return the scored
        rows of the batch sampled the step before: what this step trains on. The first step has none: it waits
        for its own batch, and a second sample of its prompts goes to be scored for the next step."""
        fresh = self._submit(self._sample(rows, step))
        if self.pending is None:
            self.pending = self._submit(self._sample(rows, step, again=True))
            return self._collect(fresh)
        previous, self.pending = self.pending, fresh
        return self._collect(previous)

    def checkpoint_state(self) -> dict:
        """What a checkpoint keeps of this worker: the batch being scored and the counts."""
        pending = [asdict(q) for q in self.pending[0]] if self.pending else []
        return {"on_policy_pending": pending, **self.counts}
