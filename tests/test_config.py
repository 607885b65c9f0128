"""Config loading and validation: every problem reported with its field path, overrides, shipped YAML."""

from pathlib import Path

import pytest
import yaml

from backpack.config import RunConfig, apply_overrides, load_config, validate_config
from backpack.data.storage import run_files
from backpack.errors import ConfigError

from conftest import EXAMPLES, REPO


def minimal(tmp_path: Path, **extra) -> dict:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    return {"name": "t", "teachers": [{"name": "a"}], "prompts": {"path": str(prompts)}, **extra}


def write(tmp_path: Path, data) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def problems_of(fn) -> list[str]:
    with pytest.raises(ConfigError) as e:
        fn()
    return e.value.problems


def test_minimal_config_gets_defaults(tmp_path):
    cfg = load_config(write(tmp_path, minimal(tmp_path)))
    assert isinstance(cfg, RunConfig)
    assert cfg.teachers[0].backend == "hf" and cfg.teachers[0].model == "default"
    assert cfg.ray.address is None and cfg.redis.url is None
    assert cfg.decoding.params().greedy
    assert cfg.dataset_dir == Path.cwd() / "runs" / "t" / "dataset"  # absolute: workers have other cwds


def test_every_problem_is_listed_with_its_path(tmp_path):
    data = minimal(tmp_path)
    data["teachers"] = [{"name": "a", "replicas": 0, "colour": "red"}, {"name": "a", "backend": "tpu"}]
    data["decoding"] = {"temperature": -1, "top_p": 2}
    data["typo_section"] = {}
    probs = problems_of(lambda: load_config(write(tmp_path, data)))
    text = "\n".join(probs)
    assert "teachers.0.replicas" in text and "(got 0)" in text
    assert "teachers.0.colour: unknown field" in text
    assert "teachers.1.backend" in text and "tpu" in text
    assert "decoding.temperature" in text and "decoding.top_p" in text
    assert "typo_section: unknown field" in text
    assert len(probs) >= 6


def test_duplicate_teacher_names_and_unknown_backend(tmp_path):
    data = minimal(tmp_path)
    data["teachers"] = [{"name": "a"}, {"name": "a"}]
    assert any("repeated: a" in p for p in problems_of(lambda: validate_config(data)))
    data["teachers"] = [{"name": "a", "backend": "tgi"}]
    assert any("unknown backend 'tgi' (choose from hf, vllm, openai)" in p
               for p in problems_of(lambda: validate_config(data)))


def test_placement_and_resources_are_checked(tmp_path):
    data = minimal(tmp_path, teachers=[{"name": "a", "resources": {"GPU": 1}},
                                       {"name": "b", "num_cpus": 0, "placement": "strict_spread"},
                                       {"name": "c", "placement": "sideways"}],
                   training={"resources_per_worker": {"trainer": -1}, "placement": "everywhere"})
    text = "\n".join(problems_of(lambda: validate_config(data)))
    assert "teachers.0.resources: 'GPU' is not a custom resource" in text
    assert "teachers.1: placement 'strict_spread' reserves each replica's resources" in text
    assert "teachers.2.placement" in text and "sideways" in text
    assert "training.resources_per_worker: resource 'trainer': amount must be >= 0" in text
    assert "training.placement" in text and "everywhere" in text
    probs = problems_of(lambda: validate_config(minimal(tmp_path, storage={"path": "s3://?region=x"})))
    assert probs[0].startswith("storage.path: 's3://?region=x' names no bucket or folder after s3://")
    remote = validate_config(minimal(tmp_path, name="r", storage={"path": "s3://bucket/runs?scheme=http",
                                                                  "local_path": str(tmp_path / "work")}))
    assert remote.storage.remote and run_files(remote).uri("dataset") == "s3://bucket/runs/r/dataset?scheme=http"
    assert remote.dataset_dir == run_files(remote).uri("dataset") and remote.run_dir.parent == tmp_path / "work"
    local = validate_config(minimal(tmp_path, name="l", storage={"path": f"file://{tmp_path}/runs"}))
    assert not local.storage.remote and local.run_dir == tmp_path / "runs" / "l"
    cfg = validate_config(minimal(tmp_path, teachers=[{"name": "a", "resources": {"teacher": 1}, "placement": "spread",
                                                       "num_gpus": 0.5}]))
    assert cfg.teachers[0].bundle() == {"CPU": 1.0, "GPU": 0.5, "teacher": 1.0}


def test_missing_required_and_files(tmp_path):
    probs = problems_of(lambda: validate_config({"name": "x"}))
    assert "teachers: required field is missing" in probs
    assert "prompts: required field is missing" in probs
    data = minimal(tmp_path)
    data["prompts"]["path"] = str(tmp_path / "nope.jsonl")
    data["teachers"][0]["model"] = str(tmp_path / "missing.gguf")
    probs = problems_of(lambda: validate_config(data))
    assert any(p.startswith("prompts.path: file not found") for p in probs)
    assert any(p.startswith("teachers.0.model: file or directory not found") for p in probs)


def test_malformed_yaml_names_line(tmp_path):
    p = write(tmp_path, "name: x\nteachers: [\n  - a: b\n")
    probs = problems_of(lambda: load_config(p))
    assert len(probs) == 1 and probs[0].startswith("(yaml): line")


def test_overrides(tmp_path):
    p = write(tmp_path, minimal(tmp_path))
    cfg = load_config(p, ["teachers.0.replicas=3", "decoding.temperature=0.7", "ray.address=auto",
                          "scheduler.policy=round_robin"])
    assert cfg.teachers[0].replicas == 3 and cfg.decoding.temperature == 0.7 and cfg.ray.address == "auto"
    assert any("teachers.0.replicas" in x for x in problems_of(lambda: load_config(p, ["teachers.0.replicas=zero"])))
    assert any("no such field path" in x for x in problems_of(lambda: load_config(p, ["teachers.5.name=x"])))
    assert any("expected key=value" in x for x in problems_of(lambda: apply_overrides({}, ["oops"])))


def test_greedy_with_many_samples_is_refused(tmp_path):
    data = minimal(tmp_path, decoding={"n": 3})
    assert any("n > 1 needs sampling" in p for p in problems_of(lambda: validate_config(data)))


# cluster/ and docker/ hold cluster and container configs, not run configs: tests/test_manifests.py checks them.
@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in REPO.rglob("*.yaml")
                                        if not {".venv", "runs"} & set(p.parts)
                                        and p.relative_to(REPO).parts[0] not in ("cluster", "docker")))
def test_every_shipped_yaml_loads(path, monkeypatch):
    monkeypatch.chdir(REPO)
    data = yaml.safe_load(Path(path).read_text())
    if isinstance(data, dict) and set(data) == {"tasks"}:  # a knowledge pack, not a run config
        from backpack.config.knowledge import load_pack

        assert load_pack(path).tasks
    else:
        load_config(path)


@pytest.mark.parametrize("name", ["quickstart.yaml", "continual.yaml", "mental.yaml", "synthesize.yaml"])
def test_shipped_examples_have_a_comment_above_every_field(name):
    lines = (EXAMPLES / name).read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            assert i > 0 and lines[i - 1].strip().startswith("#"), f"no comment above line {i + 1}: {line!r}"
