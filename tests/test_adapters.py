"""LoRA variants from peft (student.adapter): each trains only its adapter weights, and a saved version loads
back to the same model, merged or not (pissa's residual base is rebuilt the same way on load)."""

import pytest
import torch

from backpack.config import StudentConfig
from backpack.student import checkpoints
from backpack.student.autopilot import load_student
from backpack.student.registry import load_version


@pytest.mark.parametrize("adapter", ["lora", "dora", "rslora", "pissa"])
def test_a_saved_adapter_version_loads_back_to_the_same_model(tiny_model_dir, tmp_path, adapter):
    cfg = StudentConfig(base=tiny_model_dir, lora_r=4, adapter=adapter)
    ap = load_student(cfg)
    trainable = {n for n, p in ap.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("magnitude" in n for n in trainable) == (adapter == "dora")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ap.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # as training would move them
    ids = torch.tensor([[1, 5, 9, 300, 42, 7]])
    ap.model.eval()
    with torch.no_grad():
        want = ap.model(ids).logits
    checkpoints.save(tmp_path / "v1", ap.model, {"step": 1})
    meta = {"path": str(tmp_path / "v1"), "student": cfg.model_dump(), "step": 1}
    for merge in (False, True):
        back = load_version(meta, None, merge=merge)
        with torch.no_grad():
            got = back.model(ids).logits
        assert torch.allclose(got, want, atol=1e-4), (adapter, merge, (got - want).abs().max())


def test_an_adapter_variant_needs_lora_mode():
    with pytest.raises(ValueError, match="student.adapter 'dora' is a LoRA variant: it needs mode: lora"):
        StudentConfig(mode="full", adapter="dora")


def test_merge_two_lora_versions_into_a_new_one_with_its_lineage(tiny_model_dir, tmp_path, capsys):
    import json

    from backpack.config import load_config
    from backpack.data.storage import run_files
    from backpack.runtime.session import attach_redis
    from backpack.student.registry import Registry

    from conftest import REPO, run_main
    from test_server import publish

    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"name": "tasks", "storage": {"path": str(tmp_path / "runs")},
                                  "teachers": [{"name": "t", "model": tiny_model_dir}],
                                  "prompts": {"path": str(REPO / "examples" / "prompts.jsonl")},
                                  "student": {"base": tiny_model_dir, "lora_r": 4}}))
    cfg = load_config(str(config))
    student = cfg.student
    with attach_redis(cfg) as url:  # two task adapters, as two trainings would publish them
        reg = Registry(url, cfg.name, run_files(cfg))
        assert [publish(reg, student, tmp_path / f"ck{i}", shift=s) for i, s in ((1, 0.05), (2, -0.03))] == [1, 2]
    out = run_main(capsys, "merge", str(config), "1", "2", "--weights", "0.7,0.3")
    assert out.returncode == 0, out.stderr
    assert "merged tasks:v1, tasks:v2 (cat) into version 3" in out.stdout and "LoRA rank 8" in out.stdout
    with attach_redis(cfg) as url:
        reg = Registry(url, cfg.name, run_files(cfg))
        metas = {v: reg.get(v) for v in (1, 2, 3)}
    assert metas[3]["lineage"] == {"merged_from": ["tasks:v1", "tasks:v2"], "method": "cat", "weights": [0.7, 0.3],
                                   "density": None}
    # cat is exact: the merged weights are the base plus 0.7 and 0.3 of each version's change
    base = load_version(None, student, merge=True).model.state_dict()
    one, two, merged = (load_version(metas[v], None, merge=True).model.state_dict() for v in (1, 2, 3))
    for name in [n for n in base if "q_proj" in n or "v_proj" in n]:
        want = base[name] + 0.7 * (one[name] - base[name]) + 0.3 * (two[name] - base[name])
        assert torch.allclose(merged[name], want, atol=1e-5), name
    assert not torch.allclose(one[name], two[name])
    out = run_main(capsys, "merge", str(config), "1", "2", "--method", "dare_ties", "--density", "0.5")
    assert out.returncode == 0 and "(dare_ties) into version 4" in out.stdout, out.stderr
    for args, message in ((["1"], "at least two sources"), (["1", "9"], "has no student version 9"),
                          (["1", "2", "--method", "mean"], "--method 'mean'"),
                          (["1", "2", "--weights", "a,b"], "comma-separated numbers"),
                          (["1", "2", "--density", "0.3"], "--density applies to ties and dare")):
        out = run_main(capsys, "merge", str(config), *args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
