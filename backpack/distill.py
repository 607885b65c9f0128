"""Training and evaluating a run's student: what `backpack train`, `backpack eval` and `backpack run` call.

train: checks everything it can before Ray Train starts (a dataset with usable rows, a loadable student, a
tokenizer shared with the teachers when token-level KD is asked for, teacher logprobs deep enough), then fits
the student on the non-held-out rows, publishing each checkpoint as a registry version. evaluate: scores
version 0 (the untrained base) and every version on the held-out rows and writes the report. A rerun resumes
training from the run's latest checkpoint and reuses evaluations already made.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from typing import Optional

from backpack.core.config import EvalConfig, RunConfig, TrainingConfig
from backpack.core.resources import Group, bundle
from backpack.data.store import DatasetStore
from backpack.errors import BackpackError, ConfigError, DatasetError, InputError
from backpack.pipeline import Reporter, redis_for, run_lock
from backpack.runtime import ray_runtime


def require_sections(cfg: RunConfig, *sections: str) -> None:
    """A config error naming each section the command needs and the config lacks."""
    missing = [s for s in sections if getattr(cfg, s) is None]
    if missing:
        raise ConfigError(cfg.name, [f"{s}: required for this command (add a '{s}:' section)" for s in missing])


def _heldout_mask(table, fraction: float):
    """Which rows of an Arrow table or batch are held out for evaluation (by a hash of the query id): the one
    split both the checks before training and the training dataset itself use."""
    import pyarrow as pa

    from backpack.eval.evaluate import is_heldout

    return pa.array([is_heldout(q, fraction) for q in table.column("query_id").to_pylist()], type=pa.bool_())


def _split(cfg: RunConfig, store: DatasetStore):
    """(train rows table, held-out ok rows as dicts), split deterministically by query id."""
    import pyarrow.compute as pc

    table = store.read()
    if table.num_rows == 0:
        raise DatasetError(f"dataset {store.uri} is empty: run `backpack generate` first")
    held = _heldout_mask(table, (cfg.eval or EvalConfig()).heldout_fraction)
    return table.filter(pc.invert(held)), [r for r in table.filter(held).to_pylist() if r["status"] == "ok"]


def teacher_tokenizer_fingerprints(cfg: RunConfig) -> dict[str, str]:
    from transformers import AutoTokenizer

    from backpack.student.autopilot import tokenizer_fingerprint
    from backpack.teachers.loader import resolve_model

    # hf and vllm teachers encode with the model's own tokenizer; a remote endpoint's is unknown: its rows hold
    # text only, never the student's token ids
    return {t.name: tokenizer_fingerprint(AutoTokenizer.from_pretrained(resolve_model(t.model).path))
            if t.backend in ("hf", "vllm") else f"remote:{t.name}" for t in cfg.teachers}


def student_checks(cfg: RunConfig, rep: Reporter):
    """The checks of the student before any data is looked at: it loads (a missing base, a bad LoRA target,
    bad layers: clear errors here), and it shares its tokenizer with the teachers when token-level KD is
    asked for. Returns (training config to use, whether teacher token ids can be used as-is, the student)."""
    from backpack.student.autopilot import load_student

    tc = cfg.training
    student = load_student(cfg.student)
    teachers = teacher_tokenizer_fingerprints(cfg)
    same = all(fp == student.tokenizer_fingerprint for fp in teachers.values())
    if not same:
        names = [n for n, fp in teachers.items() if fp != student.tokenizer_fingerprint]
        if tc.kd_weight > 0 and tc.on_tokenizer_mismatch == "error":
            raise InputError(f"token-level KD (training.kd_weight={tc.kd_weight}) needs the student to share its "
                             f"tokenizer with the teachers, but {names} use another one (a remote endpoint's "
                             "answers never carry the student's token ids); set "
                             "training.on_tokenizer_mismatch=sequence_level to train on their text instead")
        rep.stage(f"teachers {names} use another tokenizer: training on their text only (sequence-level KD)")
        tc = tc.model_copy(update={"kd_weight": 0.0})
    return tc, same, student


def grounded_only(cfg: RunConfig) -> bool:
    """Whether training keeps only the answers grounded in their recalled context (mental.train_on)."""
    return cfg.mental is not None and cfg.mental.train_on == "grounded"


def preflight(cfg: RunConfig, train_rows, rep: Reporter) -> tuple[TrainingConfig, bool]:
    """Checks before Ray Train starts. Returns the training config to use and whether teacher token ids can be
    used as-is (shared tokenizer)."""
    from backpack.student.examples import build_examples

    tc, same, student = student_checks(cfg, rep)
    if grounded_only(cfg):
        before = train_rows.column("status").to_pylist().count("ok")
        train_rows = training_rows(train_rows, 0.0, grounded_only=True)
        rep.stage(f"mental.train_on=grounded: {train_rows.num_rows} of {before} answer(s) state only what their "
                  "recalled context says; the others are not trained on")
    rows = train_rows.to_pylist()
    examples, stats = build_examples(rows, student.tokenizer, tc.max_len, same, use_logprobs=False)
    if not examples:
        raise InputError(f"no usable training rows: {stats.rows} row(s), {stats.failed_rows} failed, "
                         f"{stats.too_long_prompt} with a prompt longer than training.max_len={tc.max_len}"
                         + (" (after mental.train_on=grounded)" if grounded_only(cfg) else ""))
    if stats.truncated:
        rep.stage(f"warning: {stats.truncated} of {stats.used} training sequence(s) are longer than "
                  f"training.max_len={tc.max_len} and were truncated")
    if tc.kd_weight > 0:
        depth = min((len(r["top_ids"][0]) for r in rows if r["status"] == "ok" and r["top_ids"]), default=0)
        if depth < tc.top_k:
            raise InputError(f"training.top_k={tc.top_k} but the dataset stores {depth} logprobs per token: "
                             f"regenerate with decoding.logprobs >= {tc.top_k} or lower training.top_k")
    return tc, same


def training_group(tc: TrainingConfig) -> Group:
    """What the Ray Train workers need of the cluster: one bundle per worker, placed by training.placement
    (Ray Train reserves them as one placement group)."""
    need = bundle(tc.cpus_per_worker, 1.0 if tc.use_gpu else 0.0, tc.resources_per_worker)
    return Group("training workers", (need,) * tc.num_workers, tc.placement)


def _last_error(err: BaseException) -> str:
    """The innermost error line of a Ray Train failure (its message carries the worker's traceback)."""
    lines = [ln.strip() for ln in str(err).splitlines() if "Error" in ln and not ln.strip().startswith("File ")]
    return lines[-1] if lines else type(err).__name__


def training_rows(batch, fraction: float, grounded_only: bool = False):
    """The rows of an Arrow batch that training may see: answered, not held out for evaluation and, with
    `grounded_only` (mental.train_on: grounded), not an answer that claims what its recalled context does not say."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keep = pc.and_(pc.equal(batch.column("status"), "ok"), pc.invert(_heldout_mask(batch, fraction)))
    if grounded_only and "context" in batch.column_names:
        from backpack.core.grounding import keep_for_training

        grounded = [keep_for_training(a, c) for a, c in zip(batch.column("text").to_pylist(),
                                                            batch.column("context").to_pylist())]
        keep = pc.and_(keep, pa.array(grounded, type=pa.bool_()))
    return batch.filter(keep)


def training_dataset(store: DatasetStore, fraction: float, grounded_only: bool = False):
    """The Ray Dataset training reads: the store's trainable rows, filtered on Arrow batches (not row by row)
    and materialized in the object store first. A batch run reads its data once this way, and the training
    steps then share no CPU with Ray Data's read and filter tasks (on a small machine they slowed every step)."""
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its plans and progress are not the run's news
    return store.to_ray_dataset().map_batches(functools.partial(training_rows, fraction=fraction,
                                                                grounded_only=grounded_only),
                                              batch_format="pyarrow").materialize()


def checkpoint_states(files) -> list[str]:
    """The state files of the run's Ray Train checkpoints (train/<ray train run>/checkpoint_*/state.json),
    relative to the run's RunFiles."""
    return [s for s in files.glob("train", "/state.json")
            if len(s.split("/")) == 4 and s.split("/")[2].startswith("checkpoint_")]


def latest_checkpoint(files) -> Optional[tuple[str, int]]:
    """(location, step) of the newest Ray Train checkpoint of this run (RunFiles of the run), if any: a local
    folder, or a URI when the run's storage is an object store."""
    best = None
    for state in checkpoint_states(files):
        step = json.loads(files.read_text(state) or "{}").get("step", 0)
        if best is None or step > best[1]:
            best = (files.uri(state.rsplit("/", 1)[0]), step)
    return best


def train(cfg: RunConfig, reporter: Optional[Reporter] = None) -> dict:
    """Train the run's student on its dataset. Returns {"step", "versions", "seconds"}."""
    require_sections(cfg, "student", "training")
    rep = reporter or Reporter()
    with run_lock(cfg):
        store = DatasetStore(str(cfg.dataset_dir), create=False)
        train_rows, _ = _split(cfg, store)
        tc, same = preflight(cfg, train_rows, rep)
        resume = latest_checkpoint(cfg.files)
        if resume and resume[1] >= tc.max_steps:
            rep.stage(f"already trained to step {resume[1]} (training.max_steps={tc.max_steps}): nothing to do")
            return {"step": resume[1], "versions": [], "seconds": 0.0}
        import ray
        import ray.train

        from backpack.student.registry import Registry
        from backpack.student.trainer import run_training

        frac = (cfg.eval or EvalConfig()).heldout_fraction
        with redis_for(cfg) as redis_url:
            started = ray_runtime.connect(cfg.ray)
            try:
                ray_runtime.check_shared_state(cfg)
                ray_runtime.check_placement([], [training_group(tc)])
                registry = Registry(redis_url, cfg.name, cfg.files)
                before = {m["version"] for m in registry.versions()}
                ds = training_dataset(store, frac, grounded_only(cfg))
                rep.stage(f"training the student ({tc.num_workers} worker(s), {tc.max_steps} steps"
                          + (f", resuming from step {resume[1]}" if resume else "") + ")")
                try:
                    res = run_training(ds, cfg.student, tc, cfg.files.sub("train"), cfg.name,
                                       resume_from=resume[0] if resume else None, dataset_version=store.version,
                                       metrics_file=cfg.files.uri("train/metrics.jsonl"),
                                       same_tokenizer=same, registry=registry)
                except ray.train.TrainingFailedError as e:
                    raise BackpackError(f"training failed after {tc.max_failures} restart(s): {_last_error(e)}; "
                                        "rerun the same command to resume from the last checkpoint") from None
                new = [m["version"] for m in registry.versions() if m["version"] not in before]
            finally:
                if started:
                    ray.shutdown()
    return {"step": res.step, "versions": new, "seconds": res.seconds}


def _eval_key(cfg: RunConfig) -> str:
    ec = cfg.eval or EvalConfig()
    return hashlib.sha256(json.dumps([ec.model_dump(), cfg.training.max_len if cfg.training else 512])
                          .encode()).hexdigest()[:12]


def evaluate(cfg: RunConfig, versions: Optional[list[int]] = None, reporter: Optional[Reporter] = None) -> dict:
    """Score version 0 and the run's versions (or `versions`) on held-out rows; write the report."""
    import torch

    from backpack.eval.evaluate import evaluate_model
    from backpack.eval.report import write_report
    from backpack.student.registry import Registry, load_version

    require_sections(cfg, "student")
    rep = reporter or Reporter()
    ec = cfg.eval or EvalConfig()
    torch.set_num_threads(os.cpu_count() or 1)
    store = DatasetStore(str(cfg.dataset_dir), create=False)
    max_len = cfg.training.max_len if cfg.training else 512
    _, held = _split(cfg, store)
    held = sorted(held, key=lambda r: r["query_id"])[: ec.max_rows]
    if not held:
        raise InputError(f"no held-out rows to evaluate on (eval.heldout_fraction={ec.heldout_fraction} of "
                         f"{store.read(columns=['query_id']).num_rows} rows): generate more prompts or raise it")
    files = cfg.files
    key = _eval_key(cfg)
    with redis_for(cfg) as redis_url:
        metas = {m["version"]: m for m in Registry(redis_url, cfg.name, cfg.files).versions()}
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
        m = evaluate_model(ap.model, ap.tokenizer, held, f"student-v{v}", ec.max_new_tokens, max_len,
                           top_k=cfg.training.top_k if cfg.training else 4, batch_size=ec.batch_size)
        m.update(version=v, step=meta["step"] if meta else 0)
        files.write_text(cache, json.dumps(m))
        results.append(m)
    training = [json.loads(line) for line in (files.read_text("train/metrics.jsonl") or "").splitlines()]
    from backpack.ops import incidents_of, replicas_of, usage_of

    extra = {"dataset_version": store.version, "heldout_rows": len(held), "student": cfg.student.model_dump(),
             "teachers": usage_of(cfg), "incidents": incidents_of(cfg),
             "replicas": replicas_of(cfg)}
    if files.local:
        return write_report(cfg.run_dir / "report", cfg.name, results, training, extra)
    with tempfile.TemporaryDirectory() as d:  # written here, then copied to the object store
        report = write_report(d, cfg.name, results, training, extra)
        files.upload(d, "report")
    return report

