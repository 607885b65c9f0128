"""The student trainer on Ray Train: 2 workers, checkpoints, a worker crash resumed from the last checkpoint."""

import json

import pytest
import torch

from backpack.config import StudentConfig, TeacherConfig, TrainingConfig
from backpack.core.schema import queries_to_table
from backpack.core.types import DecodingParams, Query
from backpack.data.store import DatasetStore
from backpack.student import checkpoints
from backpack.student.autopilot import load_student
from backpack.student.trainer import lr_factor, run_training
from backpack.teachers.hf import HFTeacher

pytestmark = pytest.mark.integration


def test_lr_schedule():
    assert [lr_factor(s, 2, 10, "constant") for s in (0, 1, 5)] == [0.5, 1.0, 1.0]
    assert lr_factor(2, 2, 10, "cosine") == pytest.approx(1.0) and lr_factor(10, 2, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(6, 2, 10, "linear") == pytest.approx(0.5)


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    teacher = HFTeacher(TeacherConfig(name="tiny", model=tiny_model_dir, batch_size=8))
    qs = [Query(messages=[{"role": "user", "content": f"prompt number {i}"}],
                decoding=DecodingParams(max_new_tokens=10, logprobs=4)) for i in range(16)]
    s = DatasetStore(tmp_path_factory.mktemp("train-data") / "ds")
    s.append(teacher.generate(queries_to_table(qs)))
    return s


def test_two_workers_checkpoint_and_resume_after_a_crash(ray_session, store, tiny_model_dir, tmp_path):
    student = StudentConfig(base=tiny_model_dir, mode="full")
    training = TrainingConfig(num_workers=2, cpus_per_worker=0.5, batch_size=2, max_steps=6, checkpoint_every=2,
                              log_every=1, lr=1e-3, kd_weight=0.5, top_k=4, max_failures=1)
    marker = tmp_path / "crashed-once"
    metrics = tmp_path / "metrics.jsonl"
    res = run_training(store.to_ray_dataset(), student, training, tmp_path / "train", "t", dataset_version=1,
                       metrics_file=str(metrics),
                       test_hooks={"fail_once_at_step": 3, "fail_once_at_step_marker": str(marker)})
    assert marker.exists(), "the test hook did not crash a worker"
    assert res.step == 6 and res.checkpoint
    with open(f"{res.checkpoint}/state.json") as f:
        state = json.load(f)
    assert state["step"] == 6 and state["dataset_version"] == 1 and state["kd"] > 0
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged[-1] == 6 and 2 in logged
    # the workers run with the allocator settings training.allocator="auto" gives them
    assert res.metrics["allocator"] == "glibc (keeps memory)"
    # the checkpoint loads into a fresh student and changed its weights
    fresh = load_student(student)
    before = {n: p.clone() for n, p in fresh.model.named_parameters()}
    checkpoints.load_weights(res.checkpoint, fresh.model)
    assert any(not torch.equal(before[n], p) for n, p in fresh.model.named_parameters())
    # (a rerun continuing from a checkpoint, resume_from, is tested through `train` with the checkpoint in a
    # bucket, test_storage.py, and by the continual trainer's second run, test_continual_trainer.py: one Ray
    # Train run fewer here)
