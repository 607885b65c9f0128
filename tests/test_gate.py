"""The promotion gate: the pure decision rule, and judging published versions in a real Redis with the tiny model."""

import json
import math

import pytest
import torch

from backpack.config import (ContinualConfig, EvalConfig, PromptsConfig, RunConfig, StorageConfig, StudentConfig,
                             TeacherConfig)
from backpack.core.schema import queries_to_table
from backpack.core.types import DecodingParams, Query
from backpack.data.splits import is_heldout
from backpack.data.store import DatasetStore
from backpack.eval.evaluate import evaluate_model
from backpack.eval.gate import Decision, Gate, decide
from backpack.student import checkpoints
from backpack.student.autopilot import load_student
from backpack.student.registry import Registry
from backpack.teachers.hf import HFTeacher

from conftest import publish_stub_versions

HELDOUT = 0.5


# ---------------------------------------------------------------- the pure rule


@pytest.mark.parametrize("metric", ["nll", "kl"])
def test_lower_is_better_metrics(metric):
    assert decide(metric, 1.9, 2.0, 0.0).promote                 # better
    assert decide(metric, 2.0, 2.0, 0.0).promote                 # equal is not worse
    assert not decide(metric, 2.1, 2.0, 0.0).promote             # worse, no margin
    assert decide(metric, 2.1, 2.0, 0.25).promote                # worse, within the margin


def test_chrf_higher_is_better():
    assert decide("chrf", 41.0, 40.0, 0.0).promote
    assert decide("chrf", 40.0, 40.0, 0.0).promote
    assert not decide("chrf", 39.0, 40.0, 0.0).promote
    assert decide("chrf", 39.0, 40.0, 1.0).promote
    assert not decide("chrf", 42.0, 40.0, 0.0).reason.startswith("chrf 42.0000 <")


def test_margin_edge_is_inclusive():
    # exact in binary floating point: candidate == live + margin is "not worse by the margin"
    assert decide("nll", 2.5, 2.0, 0.5).promote
    assert not decide("nll", 2.5 + 1e-9, 2.0, 0.5).promote
    assert decide("chrf", 39.5, 40.0, 0.5).promote
    assert not decide("chrf", 39.5 - 1e-9, 40.0, 0.5).promote


def test_reason_is_one_line_with_both_numbers():
    d = decide("nll", 2.3456, 2.1, 0.05)
    assert d == Decision(False, d.reason) and "\n" not in d.reason
    assert "2.3456" in d.reason and "2.1000" in d.reason and "0.0500" in d.reason and ">" in d.reason
    assert "<=" in decide("nll", 2.0, 2.1, 0.0).reason and ">=" in decide("chrf", 50.0, 40.0, 0.0).reason


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_candidate_that_is_not_finite_is_never_promoted(bad):
    for metric in ("nll", "kl", "chrf"):
        d = decide(metric, bad, 2.0, 100.0)
        assert not d.promote and str(bad) in d.reason


def test_a_finite_candidate_beats_a_live_score_that_is_not():
    assert decide("nll", 3.0, float("nan"), 0.0).promote
    assert not decide("kl", float("nan"), float("nan"), 0.0).promote


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="'bleu'"):
        decide("bleu", 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="-0.1"):
        decide("nll", 1.0, 1.0, -0.1)


# ---------------------------------------------------------------- judging versions


@pytest.fixture(scope="module")
def teacher_rows(tiny_model_dir):
    """The tiny model's own answers (with top-4 logprobs): a student equal to it is as good as it gets."""
    teacher = HFTeacher(TeacherConfig(name="tiny", model=tiny_model_dir))
    qs = [Query(messages=[{"role": "user", "content": f"question {i}"}],
                decoding=DecodingParams(max_new_tokens=6, logprobs=4)) for i in range(14)]
    table = teacher.generate(queries_to_table(qs))
    held = [q for q in table.column("query_id").to_pylist() if is_heldout(q, HELDOUT)]
    assert 3 <= len(held) < 14  # the ids are content hashes: the split is the same on every run
    return table


def _run(tmp_path, tiny_model_dir, metric="nll", gate_rows=16, margin=0.01) -> RunConfig:
    return RunConfig(name="gated", storage=StorageConfig(path=str(tmp_path)),
                     teachers=[TeacherConfig(name="tiny", model=tiny_model_dir)],
                     prompts=PromptsConfig(path=str(tmp_path / "unused.jsonl")),
                     student=StudentConfig(base=tiny_model_dir, lora_r=4),
                     eval=EvalConfig(heldout_fraction=HELDOUT, max_new_tokens=6),
                     continual=ContinualConfig(promote_metric=metric, promote_margin=margin, gate_rows=gate_rows))


def _publish(reg: Registry, cfg: RunConfig, tmp_path, step: int, noise: float = 0.0) -> int:
    """A version with the base's weights (noise 0: the LoRA B matrices start at zero) or with noisy adapters."""
    ap = load_student(cfg.student)
    torch.manual_seed(step)
    with torch.no_grad():
        for p in ap.model.parameters():
            if p.requires_grad and noise:
                p.add_(torch.randn_like(p) * noise)
    ck = tmp_path / f"ck{step}"
    checkpoints.save(ck, ap.model, {"step": step, "student": cfg.student.model_dump()})
    return reg.publish(ck, json.loads((ck / checkpoints.STATE).read_text()))


def _gate_events(reg: Registry) -> list[tuple[str, str]]:
    return [(e["version"], e["decision"]) for _, e in reg.events() if e["type"] == "gate"]


def test_gate_promotes_a_good_version_keeps_a_worse_one_and_caches_scores(
        teacher_rows, tiny_model_dir, redis_server, tmp_path):
    cfg = _run(tmp_path, tiny_model_dir)
    store = DatasetStore(str(cfg.dataset_dir))
    reg = Registry(redis_server.url, cfg.name, cfg.run_dir)
    good = _publish(reg, cfg, tmp_path, step=10)
    bad = _publish(reg, cfg, tmp_path, step=20, noise=0.5)
    gate = Gate(cfg, reg, threads=1)
    assert reg.get(good)["gate"] is None and reg.versions()[0]["gate"] is None

    # no held-out rows yet: kept unserved, and the record says why
    rec = gate.judge(good)
    assert rec["decision"] == "kept" and "no held-out rows yet" in rec["reason"] and rec["rows"] == 0
    assert reg.live() is None and reg.get(good)["gate"] == rec and gate.evaluations == 0

    # the data lands; judged again, the base-equal version is as good as version 0 and is promoted
    store.append(teacher_rows.slice(0, 10))
    rows = gate.gate_rows()
    assert rows and len(rows) <= 16  # store order: the first held-out rows to land
    assert all(is_heldout(r["query_id"], HELDOUT) and r["status"] == "ok" for r in rows)
    threads = torch.get_num_threads()
    rec = gate.judge(good)
    assert torch.get_num_threads() == threads  # the gate's thread count does not leak into the caller
    assert rec["decision"] == "promoted" and rec["live_version"] == 0 and rec["rows"] == len(rows)
    assert rec["candidate"] == pytest.approx(rec["live"], abs=1e-4) and rec["metric"] == "nll"
    assert set(rec) == {"version", "live_version", "metric", "candidate", "live", "margin", "rows", "decision",
                        "reason", "seconds"}
    assert reg.live() == good and reg.get(good)["gate"] == rec and gate.evaluations == 2  # v1 and v0
    promoted = [e for _, e in reg.events() if e["type"] == "promoted"]
    assert [(e["version"], e["by"], e["reason"]) for e in promoted] == [(str(good), "gate", rec["reason"])]

    # a clearly worse version is kept and not served; the live version's score comes from the cache
    rec = gate.judge(bad)
    assert rec["decision"] == "kept" and rec["live_version"] == good and rec["candidate"] > rec["live"] + 0.01
    assert f"{rec['candidate']:.4f}" in rec["reason"] and f"{rec['live']:.4f}" in rec["reason"]
    assert reg.live() == good and gate.evaluations == 3  # only the candidate was measured
    assert reg.get(bad)["gate"]["decision"] == "kept" and [m["gate"]["decision"] for m in reg.versions()] == [
        "promoted", "kept"]
    assert _gate_events(reg) == [(str(good), "kept"), (str(good), "promoted"), (str(bad), "kept")]
    cached = {p.name.split("-")[0]: json.loads(p.read_text()) for p in (cfg.run_dir / "eval" / "gate").glob("*.json")}
    assert sorted(cached) == ["v0", "v1", "v2"] and cached["v1"]["value"] == rec["live"]
    assert not any("chrf" in c["metrics"] for c in cached.values())  # nll needs no greedy answers

    # a second judgement on unchanged rows measures nothing, even from a new Gate (the cache is on disk)
    again = Gate(cfg, reg)
    assert again.judge(bad)["decision"] == "kept" and again.evaluations == 0

    # new held-out rows change the gate rows: both versions are measured again on the new rows
    store.append(teacher_rows.slice(10))
    assert len(gate.gate_rows()) > len(rows)
    rec = again.judge(bad)
    assert rec["decision"] == "kept" and rec["rows"] > len(rows) and again.evaluations == 2
    assert reg.live() == good

    with pytest.raises(ValueError, match=f"version {good} is already live"):
        gate.judge(good)
    with pytest.raises(KeyError, match="no student version 9"):
        gate.judge(9)


def test_gate_on_chrf_compares_greedy_answers(tiny_model_dir, redis_server, tmp_path):
    # the tiny base answers only newlines (chrF 0 against anything); a noisy version answers words, and here
    # the "teacher" is that noisy version, so its greedy answers agree with the stored ones and the base's do not
    from backpack.student.registry import load_version

    cfg = _run(tmp_path, tiny_model_dir, metric="chrf", gate_rows=4, margin=0.0)
    reg = Registry(redis_server.url, cfg.name, cfg.run_dir)
    noisy = _publish(reg, cfg, tmp_path, step=5, noise=0.5)
    ap = load_version(reg.get(noisy), merge=True)
    teacher = HFTeacher.from_model("noisy", ap.model, ap.tokenizer, fingerprint="noisy")
    qs = [Query(messages=[{"role": "user", "content": f"question {i}"}], decoding=DecodingParams(max_new_tokens=6))
          for i in range(14)]
    DatasetStore(str(cfg.dataset_dir)).append(teacher.generate(queries_to_table(qs)))
    gate = Gate(cfg, reg)
    rec = gate.judge(noisy)
    assert rec["metric"] == "chrf" and rec["rows"] == 4 and rec["live_version"] == 0
    assert rec["decision"] == "promoted" and rec["candidate"] > 50.0 > rec["live"] and reg.live() == noisy
    base = _publish(reg, cfg, tmp_path, step=6)
    rec = gate.judge(base)
    assert rec["decision"] == "kept" and rec["live_version"] == noisy and reg.live() == noisy
    assert gate.evaluations == 3 and _gate_events(reg) == [(str(noisy), "promoted"), (str(base), "kept")]
    # chrf pays for greedy answers; its cached metrics say so
    cached = [json.loads(p.read_text()) for p in (cfg.run_dir / "eval" / "gate").glob("v0-chrf-*.json")]
    assert len(cached) == 1 and "gen_tokens_per_s" in cached[0]["metrics"]


def test_evaluate_model_without_generation_gives_the_same_forward_metrics(teacher_rows, tiny_model_dir):
    ap = load_student(StudentConfig(base=tiny_model_dir, mode="full"))
    rows = teacher_rows.to_pylist()[:4]
    full = evaluate_model(ap.model, ap.tokenizer, rows, "full", max_new_tokens=6)
    fast = evaluate_model(ap.model, ap.tokenizer, rows, "fast", max_new_tokens=6, generate=False)
    assert not {"chrf", "gen_tokens_per_s", "samples"} & set(fast) and "chrf" in full
    for k in ("nll", "perplexity", "kl_to_teacher", "eval_rows", "eval_tokens", "params"):
        assert fast[k] == full[k] or (math.isnan(fast[k]) and math.isnan(full[k]))


def test_the_gate_never_overrides_a_promote_made_while_it_scored(redis_server, tmp_path):
    # scores are stubbed: what is tested is the compare-and-set of the live version against an operator
    cfg = _run(tmp_path, "unused-base")
    reg = Registry(redis_server.url, cfg.name, cfg.run_dir)
    publish_stub_versions(reg, tmp_path)
    gate = Gate(cfg, reg)
    gate.gate_rows = lambda: [{"query_id": "q", "top_ids": [[1]]}]

    def score_while_the_operator_promotes(version, rows):
        if version == 3:
            reg.promote(1, by="user", reason="backpack promote")  # made while the gate measures version 3
        return 1.0 if version == 3 else 2.0  # version 3 is better: the rule alone would promote it
    gate.score = score_while_the_operator_promotes
    rec = gate.judge(3)
    assert reg.live() == 1  # the operator's choice stands
    assert rec["decision"] == "kept" and "the live version changed while the gate scored" in rec["reason"]
    assert reg.get(3)["gate"]["decision"] == "kept"
    assert reg.promote(2, if_live=1) and reg.live() == 2
    assert not reg.promote(3, if_live=1) and reg.live() == 2  # compare-and-set: 1 is no longer live
