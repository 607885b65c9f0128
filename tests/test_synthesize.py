"""`backpack synthesize`: Self-Instruct and knowledge-pack requests and replies (pure), a tiny synthesize ->
generate on the default model through the real scheduler, and bad seed files refused with one message."""

import json

import pyarrow.parquet as pq
import pytest

from backpack.config import validate_config
from backpack.config.knowledge import load_pack
from backpack.errors import ConfigError
from backpack.synthesis.from_pack import STYLES, build_pack_requests, example_questions, pack_items
from backpack.synthesis.self_instruct import Seed, build_requests, parse_reply

from conftest import EXAMPLES, run_main

SEEDS = [Seed(f"s{i}", "general", t) for i, t in enumerate([
    "What is the capital of Australia?", "Write a haiku about a train station at dawn.",
    "Explain how a refrigerator keeps food cold.", "Give three tips for learning to juggle."])]


def test_requests_are_reproducible_and_show_seeds_and_kept_prompts():
    a = build_requests(1, 3, SEEDS, ["Name a red fruit."], per_request=5, seeds_shown=2, generated_shown=1, seed=7)
    b = build_requests(1, 3, SEEDS, ["Name a red fruit."], per_request=5, seeds_shown=2, generated_shown=1, seed=7)
    assert [r.messages for r in a] == [r.messages for r in b]  # a rerun sends the same requests (resume)
    other = build_requests(2, 3, SEEDS, ["Name a red fruit."], per_request=5, seeds_shown=2, generated_shown=1,
                           seed=7)
    assert [r.messages for r in other] != [r.messages for r in a]
    text = a[0].messages[0]["content"]
    assert "Name a red fruit." in text and "Write 5 new tasks" in text and "starting at 4" in text
    assert len(a[0].seed_ids) == 2 and all(SEEDS[int(i[1:])].text in text for i in a[0].seed_ids)


def test_a_reply_becomes_its_numbered_items():
    reply = "Sure!\n4. Name a planet\n   with rings.\n5) What is 2 + 2?\n\n6: Translate 'cat' to French."
    assert parse_reply(reply) == ["Name a planet with rings.", "What is 2 + 2?", "Translate 'cat' to French."]
    assert parse_reply("Describe a sunset over the sea.") == ["Describe a sunset over the sea."]
    assert parse_reply("") == []


PACK = EXAMPLES / "mental" / "pellucid.yaml"


def test_pack_requests_ask_about_every_item_in_every_style():
    from backpack.synthesis.from_pack import _ASK

    pack = load_pack(PACK)
    items, examples = pack_items(pack), example_questions(pack)
    assert len(items) == 21 and len(examples) == 5 and items[-1].text.startswith("Q: ")
    requests = build_pack_requests(1, 4 * len(items), items, examples, per_request=6, seed=3)
    assert [r.messages for r in requests] == [r.messages for r in build_pack_requests(
        1, 4 * len(items), items, examples, per_request=6, seed=3)]  # a rerun sends the same requests
    by_item = {}
    for r in requests:
        text = r.messages[0]["content"]
        style = next(s for s in STYLES if _ASK[s] in text)
        by_item.setdefault(r.seed_ids[0], []).append(style)
        assert r.task == "pellucid" and "Write 6 different questions" in text
        shown = [it for it in items if it.id in r.seed_ids]
        assert all(it.text in text for it in shown) and len(shown) == (2 if style == "combine" else 1)
        assert any(e in text for e in examples)
    assert sorted(by_item) == sorted(it.id for it in items)
    assert all(styles == list(STYLES) for styles in by_item.values())
    later = build_pack_requests(2, 4, items, examples, per_request=6, seed=3)
    assert [r.seed_ids[0] for r in later] == [it.id for it in (items * 2)[4:8]]  # the walk goes on


def test_a_pack_source_needs_a_pack_and_holds_out_a_questions_file(tmp_path):
    from backpack.run.synthesize import _heldout_texts, _Source

    base = {"name": "syn", "teachers": [{"name": "t"}], "prompts": {"path": "synthesized"}}
    with pytest.raises(ConfigError, match="neither synthesis.pack nor mental.path"):
        validate_config({**base, "synthesis": {"source": "pack"}})
    with pytest.raises(ConfigError, match="source is seeds but no seeds file"):
        validate_config({**base, "synthesis": {}})
    cfg = validate_config({**base, "synthesis": {"source": "pack"}, "mental": {"path": str(PACK)}})
    source = _Source(cfg)
    assert source.examples[0].startswith("The frame of my Skerry 7") and len(source.items) == 21
    assert [r.seed_ids[0] for r in source.requests(1, [])][:2] == ["founding", "showroom"]
    held = _heldout_texts(str(EXAMPLES / "mental" / "questions-48.jsonl"))
    assert len(held) == 48 and held[0] == "In which year did Pellucid start making bicycles?"


def _config(tmp_path, smol_dir, seeds_path, **synthesis):
    return validate_config({
        "name": "syn", "storage": {"path": str(tmp_path / "runs")},
        "teachers": [{"name": "smol", "model": smol_dir, "replicas": 1, "batch_size": 4, "threads": 2,
                      "num_cpus": 1}],
        "synthesis": {"seeds": str(seeds_path), "target": 3, "rounds": 1, "requests_per_round": 2,
                      "per_request": 3, "max_new_tokens": 64, "heldout": str(EXAMPLES / "prompts.jsonl"),
                      **synthesis},
        "prompts": {"path": "synthesized"},
        "decoding": {"max_new_tokens": 6}})


@pytest.mark.integration
def test_synthesize_then_generate_on_the_default_model(ray_session, smol_dir, tmp_path, capsys):
    from backpack.run.generate import generate
    from backpack.run.synthesize import synthesize

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"id": s.id, "task": s.task, "prompt": s.text}) + "\n" for s in SEEDS))
    cfg = _config(tmp_path, smol_dir, seeds)
    res = synthesize(cfg)
    assert res.requests == 2 and res.failed_requests == 0 and res.tokens > 0 and res.generated > 0
    folder = cfg.run_dir / "synthesis" / f"v{res.version}"
    kept = pq.read_table(folder / "prompts.parquet").to_pylist()
    rejected = pq.read_table(folder / "rejected.parquet").to_pylist()
    # nothing dropped silently: every candidate is kept or rejected with a reason
    assert len(kept) + len(rejected) == res.generated and len(kept) == res.kept
    assert res.funnel[0] == ("generated", res.generated) and res.funnel[-1][1] == res.kept
    assert all(r["reason"] for r in rejected)
    assert kept, f"the teacher's replies kept nothing: {[r['reason'] for r in rejected]}"
    assert all(k["written_by"] == "smol" and k["source"] == "seeds" and k["seed_ids"] and k["round"] >= 1
               for k in kept)
    # `backpack data show` prints the funnel of the set
    shown = run_main(capsys, "data", "show", str(cfg.run_dir / "synthesis"))
    assert shown.returncode == 0 and "generated" in shown.stdout and f"v{res.version}" in shown.stdout

    # the synthesized set is the run's prompt collection: the teacher answers every kept prompt
    gen = generate(cfg)
    assert gen.ok_rows == len(kept) and gen.failed_rows == 0

    # a rerun sends nothing to the teachers (its requests are stored) and writes the same set as a new version
    again = synthesize(cfg)
    assert again.version == res.version + 1 and again.tokens == res.tokens
    assert pq.read_table(cfg.run_dir / "synthesis" / f"v{again.version}" / "prompts.parquet").column(
        "prompt").to_pylist() == [k["prompt"] for k in kept]


def test_bad_seed_files_and_a_missing_set_are_one_message_each(tmp_path, smol_dir, capsys):
    from backpack.errors import InputError
    from backpack.run.synthesize import read_seeds, synthesized_prompts

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Name a planet."}\n{"prompt": 3}\n')
    with pytest.raises(InputError, match="holds no prompts"):
        read_seeds(str(empty), None)
    with pytest.raises(InputError, match=r"bad.jsonl line 2: 'prompt' must be a string"):
        read_seeds(str(bad), None)
    with pytest.raises(InputError, match="no synthesized prompts yet: run `backpack synthesize`"):
        synthesized_prompts(_config(tmp_path, smol_dir, bad))
    cfg = tmp_path / "syn.yaml"
    cfg.write_text(json.dumps({"name": "syn", "teachers": [{"name": "t", "model": smol_dir}],
                               "prompts": {"path": "synthesized"},
                               "synthesis": {"seeds": str(tmp_path / "none.jsonl")}}))
    out = run_main(capsys, "synthesize", str(cfg))
    assert out.returncode == 2 and "synthesis.seeds: file not found" in out.stderr and "Traceback" not in out.stderr
    cfg.write_text(json.dumps({"name": "syn", "teachers": [{"name": "t", "model": smol_dir}],
                               "prompts": {"path": "synthesized"}}))
    out = run_main(capsys, "validate", str(cfg))
    assert out.returncode == 2 and "no synthesis: section" in out.stderr
