"""`backpack eval`: score version 0 (the untrained base) and the run's versions on the held-out rows, and write
the report. Evaluations already made (same settings) are reused."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Optional

from backpack.config import RunConfig
from backpack.data.splits import split
from backpack.data.storage import run_files
from backpack.data.store import DatasetStore
from backpack.errors import InputError
from backpack.runtime.progress import Reporter
from backpack.runtime.session import attach_redis


def _eval_key(cfg: RunConfig) -> str:
    """The settings an evaluation depends on: a cached one is reused only under the same."""
    # "answers": evaluations hold every greedy answer since the judge grades them (older ones are made again)
    return hashlib.sha256(json.dumps([cfg.eval.model_dump(), cfg.training.max_len, "answers"]).encode()
                          ).hexdigest()[:12]


ON_POLICY_COUNTS = ("on_policy_batches", "off_policy_batches", "scored_samples", "scored_tokens", "failed_scores",
                    "reused_scores")


def on_policy_of(files, training: list[dict], samples: int = 3) -> dict:
    """{"on_policy": what the trainer last counted (batches on and off policy, samples and teacher tokens scored)
    and the last few scored samples}, or {} for a run trained off-policy only."""
    from backpack.student.on_policy import ON_POLICY_DATASET

    last = next((m for m in reversed(training) if "on_policy_batches" in m), None)
    if last is None:
        return {}
    out = {k: last.get(k, 0) for k in ON_POLICY_COUNTS}
    rows = []
    if files.exists(f"{ON_POLICY_DATASET}/manifest.json"):
        rows = [r for r in DatasetStore(files.uri(ON_POLICY_DATASET), create=False).read().to_pylist()
                if r["status"] == "ok"]
    out["samples"] = [{"prompt": r["messages"][-1]["content"], "student": r["text"], "step": r["student_version"],
                       "teacher_logprob_per_token": sum(r["token_logprobs"]) / max(1, len(r["token_logprobs"]))}
                      for r in rows[-samples:]]
    return {"on_policy": out}


def judged_of(files) -> dict:
    """{"judge": {judge: {version: its verdicts' summary}}} from `backpack eval --judge` runs, or {}."""
    out = {}
    for path in files.glob("eval", ".json"):
        name = path.rsplit("/", 1)[-1]
        if name.startswith("judge-"):
            out[name[len("judge-"):-len(".json")]] = json.loads(files.read_text(path))
    return {"judge": out} if out else {}


def heldout_rows(cfg: RunConfig, store: DatasetStore) -> list[dict]:
    """The held-out rows every version is scored on (the same ones for the metrics and the judge)."""
    _, held = split(store, cfg.eval.heldout_fraction)
    return sorted(held, key=lambda r: r["query_id"])[: cfg.eval.max_rows]


def evaluate(cfg: RunConfig, versions: Optional[list[int]] = None, reporter: Optional[Reporter] = None) -> dict:
    """Score version 0 and the run's versions (or `versions`) on held-out rows; write the report."""
    import torch

    from backpack.eval.evaluate import evaluate_model
    from backpack.eval.report import write_report
    from backpack.run.ops import incidents_of, replicas_of, usage_of
    from backpack.student.registry import Registry, load_version

    cfg.require("student")
    rep = reporter or Reporter()
    ec, files = cfg.eval, run_files(cfg)
    torch.set_num_threads(os.cpu_count() or 1)
    store = DatasetStore(str(cfg.dataset_dir), create=False)
    held = heldout_rows(cfg, store)
    if not held:
        raise InputError(f"no held-out rows to evaluate on (eval.heldout_fraction={ec.heldout_fraction} of "
                         f"{store.read(columns=['query_id']).num_rows} rows): generate more prompts or raise it")
    key = _eval_key(cfg)
    with attach_redis(cfg) as redis_url:
        metas = {m["version"]: m for m in Registry(redis_url, cfg.name, files).versions()}
    wanted = versions if versions is not None else sorted(metas)
    if versions is None and not ec.every_version and wanted:
        wanted = [wanted[-1]]
    unknown = [v for v in wanted if v != 0 and v not in metas]
    if unknown:
        raise InputError(f"no student version(s) {unknown} in run {cfg.name!r} (it has {sorted(metas) or 'none'})")
    results = []
    for v in [0] + [v for v in wanted if v != 0]:
        cache = f"eval/v{v}-{key}.json"
        cached = files.read_text(cache)
        if cached is not None:
            results.append(json.loads(cached))
            continue
        rep.stage(f"evaluating version {v} on {len(held)} held-out prompt(s)")
        meta = metas.get(v)
        ap = load_version(meta, cfg.student, merge=True)
        m = evaluate_model(ap.model, ap.tokenizer, held, f"student-v{v}", ec.max_new_tokens, cfg.training.max_len,
                           top_k=cfg.training.top_k, batch_size=ec.batch_size)
        m.update(version=v, step=meta["step"] if meta else 0)
        files.write_text(cache, json.dumps(m))
        results.append(m)
    training = [json.loads(line) for line in (files.read_text("train/metrics.jsonl") or "").splitlines()]
    extra = {"dataset_version": store.version, "heldout_rows": len(held), "student": cfg.student.model_dump(),
             "teachers": usage_of(cfg), "incidents": incidents_of(cfg), "replicas": replicas_of(cfg),
             **on_policy_of(files, training), **judged_of(files)}
    if files.local:
        return write_report(cfg.run_dir / "report", cfg.name, results, training, extra)
    with tempfile.TemporaryDirectory() as d:  # written here, then copied to the object store
        report = write_report(d, cfg.name, results, training, extra)
        files.upload(d, "report")
    return report
