"""`backpack export`: a LoRA version (merged) as a model directory and a quantised GGUF file, a layer subset of the
base as a full-precision GGUF, each loaded back by plain transformers in a fresh process (the export's own check:
backpack/student/roundtrip.py imports no Backpack); bad arguments are one message each. vLLM loading an export is
checked by tests/test_vllm_teacher.py, whose server serves the default model as exported."""

import json

from conftest import REPO, run_main

def test_export_a_lora_version_and_a_layer_subset_as_hf_and_gguf(tiny_model_dir, tmp_path, capsys):
    from backpack.config import StudentConfig, load_config
    from backpack.data.storage import run_files
    from backpack.runtime.session import attach_redis
    from backpack.student.registry import Registry

    from test_server import publish

    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({
        "name": "exp", "storage": {"path": str(tmp_path / "runs")},
        "teachers": [{"name": "tiny", "model": tiny_model_dir}],
        "prompts": {"path": str(REPO / "examples" / "prompts.jsonl")},
        "student": {"base": tiny_model_dir, "mode": "lora", "lora_r": 4}}))
    cfg = load_config(str(config))
    with attach_redis(cfg) as url:  # a version as training publishes one, its LoRA weights moved off zero
        registry = Registry(url, cfg.name, run_files(cfg))
        assert publish(registry, StudentConfig(base=tiny_model_dir, lora_r=4), tmp_path / "ck", shift=0.05) == 1
    out = run_main(capsys, "export", str(config), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert out.returncode == 0, out.stderr
    assert "exported version 1 as hf" in out.stdout and "the same greedy answers to 4 probe prompts" in out.stdout
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= files
    assert not any(name.startswith("adapter") for name in files)  # the LoRA is merged: a plain model
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "# exp v1" in card and "tiny (" in card and "merged into the base" in card
    assert "as a 2-layer model" in out.stdout
    target = tmp_path / "student.gguf"
    out = run_main(capsys, "export", str(config), "--format", "gguf", "--out", str(target))  # q8_0 by default
    assert out.returncode == 0, out.stderr
    assert "as gguf (q8_0)" in out.stdout and "tolerance 0.05" in out.stdout and target.is_file()
    assert target.stat().st_size < (tmp_path / "hf" / "model.safetensors").stat().st_size  # 8-bit, the vocabulary besides
    assert not list(tmp_path.glob(".*partial*"))
    # a layer subset of the base (version 0: untrained) is a normal model of its depth
    subset = tmp_path / "subset.yaml"
    subset.write_text(json.dumps({**json.loads(config.read_text()), "name": "sub",
                                  "student": {"base": tiny_model_dir, "mode": "full", "layers": [1]}}))
    out = run_main(capsys, "export", str(subset), "--format", "gguf", "--quant", "f32", "--version", "0",
                   "--out", str(tmp_path / "g"))
    assert out.returncode == 0, out.stderr
    assert "the same greedy answers" in out.stdout and (tmp_path / "g" / "sub-v0-f32.gguf").is_file()
    assert "as a 1-layer model" in out.stdout
    # never overwritten; bad arguments are one message each
    for args, message in (((["--format", "hf", "--out", str(tmp_path / "hf")]), "exists: give a new path"),
                          (["--format", "gguf", "--quant", "q2", "--out", str(tmp_path / "x.gguf")], "--quant 'q2'"),
                          (["--format", "hf", "--quant", "q8_0", "--out", str(tmp_path / "y")], "gguf only"),
                          (["--format", "hf", "--version", "9", "--out", str(tmp_path / "z")],
                           "has no student version 9 (it has 1)")):
        out = run_main(capsys, "export", str(config), *args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
