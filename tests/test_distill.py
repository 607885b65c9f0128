"""A whole distillation in the shared Ray session: generate -> train (Ray Train) -> evaluate -> report, its
rerun (nothing trained or evaluated twice), and the checks that refuse a bad training run before Ray Train starts."""

import json

import pytest

from backpack.config import validate_config
from backpack.errors import ConfigError, InputError
from backpack.run.evaluate import evaluate
from backpack.run.generate import generate
from backpack.run.train import train

from conftest import EXAMPLES

pytestmark = pytest.mark.integration


def small_config(tmp_path, tiny_model_dir, **over):
    data = {
        "name": "e2e", "storage": {"path": str(tmp_path)},
        "teachers": [{"name": "smol", "replicas": 1, "batch_size": 6, "threads": 2, "num_cpus": 1}],
        "prompts": {"path": str(EXAMPLES / "prompts.jsonl"), "limit": 14},
        "decoding": {"max_new_tokens": 10, "logprobs": 4},
        "student": {"base": tiny_model_dir, "mode": "full"},
        "training": {"num_workers": 1, "cpus_per_worker": 1, "batch_size": 4, "max_steps": 4,
                     "checkpoint_every": 2, "log_every": 1, "lr": 1e-3, "kd_weight": 0.5, "top_k": 4},
        "eval": {"heldout_fraction": 0.3, "max_rows": 4, "max_new_tokens": 8},
    }
    for k, v in over.items():
        data[k] = {**data[k], **v}
    return validate_config(data)


def test_whole_distillation_and_its_rerun(ray_session, smol_dir, tiny_model_dir, tmp_path):
    cfg = small_config(tmp_path, tiny_model_dir)
    gen = generate(cfg)
    assert gen.ok_rows == 14
    res = train(cfg)
    assert res["step"] == 4 and res["versions"] == [1, 2]
    report = evaluate(cfg)
    versions = report["versions"]
    assert [v["version"] for v in versions] == [0, 1, 2] and [v["step"] for v in versions] == [0, 2, 4]
    assert versions[-1]["nll"] < versions[0]["nll"]  # the student moved towards the teacher's answers
    assert all(v["eval_rows"] == versions[0]["eval_rows"] > 0 for v in versions)
    out = cfg.run_dir / "report"
    assert (out / "report.png").exists() and "| 2 | 4 |" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["training"][-1]["step"] == 4
    # the held-out prompts were never trained on: the registry's versions say which dataset they saw
    assert report["dataset_version"] == 1
    # a rerun finds the checkpoint at step 4, trains nothing more and reuses the evaluations (a higher budget
    # continuing from the checkpoint is tested with the run's files in a bucket, test_storage.py: the same code
    # with a URI for a folder, and one Ray Train run fewer here)
    assert train(cfg)["versions"] == []
    assert evaluate(cfg)["versions"] == versions


def test_bad_training_runs_are_refused_before_ray_train(ray_session, smol_dir, tiny_model_dir, tmp_path):
    cfg = small_config(tmp_path, tiny_model_dir, prompts={"limit": 6})
    generate(cfg)
    with pytest.raises(InputError, match="training.top_k=8 but the dataset stores 4 logprobs"):
        train(small_config(tmp_path, tiny_model_dir, prompts={"limit": 6}, training={"top_k": 8}))
    with pytest.raises(InputError, match="no usable training rows"):
        train(small_config(tmp_path, tiny_model_dir, prompts={"limit": 6}, training={"max_len": 8}))
    with pytest.raises(InputError, match="target_modules"):
        train(small_config(tmp_path, tiny_model_dir, prompts={"limit": 6},
                           student={"mode": "lora", "target_modules": ["nope"]}))
    with pytest.raises(ConfigError, match="student"):
        train(validate_config({**cfg.model_dump(), "student": None}))
    assert not (cfg.run_dir / "train").exists()  # nothing reached Ray Train
