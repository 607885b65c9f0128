"""On-policy distillation: the student's samples become Queries a teacher scores with the recalled context the
student writes without; scored rows train with the sample's own stop token and the teacher's logprobs; a config
that cannot score is refused; and real on-policy training through Ray Train, a teacher actor and the scheduler,
resumed after a killed worker without scoring again what is stored."""

import json

import pytest
import torch

from backpack.config import StudentConfig, TeacherConfig, TrainingConfig, validate_config
from backpack.core.chat import encode_chat
from backpack.core.schema import queries_to_table
from backpack.core.types import DecodingParams, Query
from backpack.data.store import DatasetStore
from backpack.errors import ConfigError
from backpack.student.examples import build_examples, collate
from backpack.student.on_policy import sample_queries
from backpack.teachers.hf import HFTeacher

from conftest import EXAMPLES

PASSAGE = "The shop on Elm Street opens at 9 and closes at 17."


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return HFTeacher(TeacherConfig(name="tiny", model=tiny_model_dir, batch_size=8))


@pytest.fixture(scope="module")
def teacher_rows(tiny):
    """Teacher answers (with logprobs) to 16 prompts, the first two with a recalled passage."""
    qs = [Query(messages=[{"role": "user", "content": f"prompt number {i}"}], context=PASSAGE if i < 2 else None,
                decoding=DecodingParams(max_new_tokens=8, logprobs=4)) for i in range(16)]
    return tiny.generate(queries_to_table(qs))


def test_samples_are_scored_with_the_context_the_student_writes_without(tiny, teacher_rows):
    from types import SimpleNamespace

    rows = teacher_rows.to_pylist()[:4]
    oc = SimpleNamespace(max_new_tokens=6, temperature=1.0, top_p=1.0)
    qs = sample_queries(tiny, rows, oc, top_k=3, step=5, seed=0)
    assert len(qs) == 4 and all(q.scoring and q.student_version == 5 and q.decoding.logprobs == 3 for q in qs)
    assert qs[0].context == PASSAGE and qs[2].context is None and qs[0].messages == rows[0]["messages"]
    again = sample_queries(tiny, rows, oc, top_k=3, step=5, seed=0)
    assert [q.score_ids for q in again] == [q.score_ids for q in qs]  # seeded by step: a resume samples the same
    # the teacher scores the sample with the passage in front of the prompt ...
    with_context = tiny.generate(queries_to_table(qs[:1])).to_pylist()[0]
    bare = Query(messages=qs[0].messages, decoding=qs[0].decoding, score_ids=qs[0].score_ids)
    without = tiny.generate(queries_to_table([bare])).to_pylist()[0]
    assert with_context["prompt_tokens"] > without["prompt_tokens"]
    assert with_context["token_logprobs"] != pytest.approx(without["token_logprobs"], abs=1e-6)
    # ... and the student trains on it without: its prompt is the messages alone, its labels the sample as scored
    (ex,), _ = build_examples([with_context], tiny.tokenizer, 512, True, True)
    prompt = encode_chat(tiny.tokenizer, rows[0]["messages"])
    assert ex.input_ids == prompt + list(qs[0].score_ids) and ex.labels[len(prompt):] == list(qs[0].score_ids)
    assert ex.token_logprobs[len(prompt):] == pytest.approx(with_context["token_logprobs"])
    batch = collate([ex], tiny.tokenizer.pad_token_id, 3)
    assert batch["teacher_logprobs"].shape == batch["labels"].shape and bool(batch["kd_mask"][0, len(prompt)])


def test_a_run_whose_teachers_cannot_score_is_refused_with_its_names():
    base = {"name": "op", "prompts": {"path": str(EXAMPLES / "prompts.jsonl")}, "training": {"objective": "mixed"},
            "teachers": [{"name": "api", "backend": "openai", "model": "m",
                          "endpoint": {"base_url": "http://127.0.0.1:9/v1"}}]}
    with pytest.raises(ConfigError, match="teacher.s. api .backend openai. cannot"):
        validate_config(base)
    base["teachers"][0]["endpoint"]["scoring"] = "vllm"
    assert validate_config(base).training.objective == "mixed"
    with pytest.raises(ConfigError, match="on_policy.lambda"):
        validate_config({**base, "training": {"objective": "mixed", "on_policy": {"lambda": 1.5}}})


@pytest.mark.integration
def test_on_policy_training_resumes_after_a_killed_worker_reusing_stored_scores(ray_session, tiny_model_dir,
                                                                                 teacher_rows, tmp_path):
    from backpack.run.actors import spawn_scheduler
    from backpack.run.pool import TeacherPool
    from backpack.student.trainer import run_training

    store = DatasetStore(tmp_path / "ds")
    store.append(teacher_rows)
    scored = DatasetStore(tmp_path / "on_policy")
    pool = TeacherPool([TeacherConfig(name="tiny", model=tiny_model_dir, replicas=1, batch_size=4, threads=1,
                                      num_cpus=0.5)])
    try:
        pool.start()
        schedulers = [spawn_scheduler(pool.replicas, scored, None, flush_rows=4)]
        training = TrainingConfig(num_workers=1, cpus_per_worker=0.5, batch_size=4, max_steps=4, checkpoint_every=2,
                                  log_every=1, lr=1e-3, top_k=4, objective="on_policy", max_failures=1,
                                  on_policy={"max_new_tokens": 6})
        marker = tmp_path / "crashed-once"
        res = run_training(store.to_ray_dataset(), StudentConfig(base=tiny_model_dir, mode="full"), training,
                           tmp_path / "train", "op", metrics_file=str(tmp_path / "metrics.jsonl"),
                           on_policy={"schedulers": schedulers, "store": str(tmp_path / "on_policy")},
                           test_hooks={"fail_once_at_step": 3, "fail_once_at_step_marker": str(marker)})
    finally:
        pool.shutdown()
    assert marker.exists() and res.step == 4
    m = res.metrics
    assert m["on_policy_batches"] == 4 and m["off_policy_batches"] == 0 and m["kd"] > 0
    assert m["scored_samples"] >= 16 and m["scored_tokens"] > 0 and m["failed_scores"] == 0
    assert m["reused_scores"] >= 1  # the batch in flight at the checkpoint was scored before the crash
    rows = scored.read().to_pylist()
    assert rows and all(r["score_ids"] == r["token_ids"] and r["student_version"] is not None for r in rows)
    # the batch in flight at step 2's checkpoint, trained on after the resume, was scored once
    states = sorted((tmp_path / "train").glob("*/checkpoint_*/state.json"))
    at_two = [json.loads(p.read_text()) for p in states if json.loads(p.read_text())["step"] == 2]
    pending = {d["id"] for d in at_two[0]["on_policy_pending"]} if at_two else set()
    ids = [r["query_id"] for r in rows if r["query_id"] in pending]
    assert pending and sorted(ids) == sorted(pending)
    assert torch.isfinite(torch.tensor(m["loss"]))


@pytest.mark.integration
def test_backpack_train_mixed_runs_the_teachers_beside_the_trainer_and_reports_both(ray_session, tiny_model_dir,
                                                                                    tmp_path):
    from backpack.run.evaluate import evaluate
    from backpack.run.generate import generate
    from backpack.run.train import train

    cfg = validate_config({
        "name": "mixed", "storage": {"path": str(tmp_path)},
        "teachers": [{"name": "tiny", "model": tiny_model_dir, "replicas": 1, "batch_size": 8, "threads": 1,
                      "num_cpus": 0.5}],
        "prompts": {"path": str(EXAMPLES / "prompts.jsonl"), "limit": 12},
        "decoding": {"max_new_tokens": 6, "logprobs": 4},
        "student": {"base": tiny_model_dir, "mode": "full"},
        "training": {"num_workers": 1, "cpus_per_worker": 0.5, "batch_size": 4, "max_steps": 6, "checkpoint_every": 3,
                     "log_every": 1, "lr": 1e-3, "top_k": 4, "objective": "mixed",
                     "on_policy": {"lambda": 0.5, "loss": "sampled", "max_new_tokens": 5}},
        "eval": {"heldout_fraction": 0.25, "max_rows": 3, "max_new_tokens": 4}})
    generate(cfg)
    assert train(cfg)["step"] == 6
    report = evaluate(cfg)
    op = report["on_policy"]
    assert op["on_policy_batches"] + op["off_policy_batches"] == 6
    assert op["on_policy_batches"] >= 1 and op["off_policy_batches"] >= 1  # seed 0's draws at lambda 0.5
    assert op["scored_samples"] > 0 and op["samples"] and op["samples"][0]["student"] is not None
    text = (cfg.run_dir / "report" / "report.md").read_text()
    assert "## On-policy training" in text and "samples scored by the teachers" in text
    scored = DatasetStore(cfg.run_dir / "on_policy", create=False).read()
    assert set(scored.column("teacher").to_pylist()) == {"tiny"}
