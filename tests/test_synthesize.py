"""`backpack synthesize`: Self-Instruct and knowledge-pack requests and replies (pure), a tiny synthesize ->
generate on the default model through the real scheduler, and bad seed files refused with one message."""

import json

import pyarrow.parquet as pq
import pytest

from backpack.config import validate_config
from backpack.config.knowledge import load_pack
from backpack.errors import ConfigError
from backpack.synthesis.evol import EVOLUTIONS, build_evol_requests, parse_rewrite
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


def test_the_weakest_prompts_come_from_the_judge_and_the_facts_worst_first():
    from backpack.eval.weakest import facts_weak, judged_weak, latest_version, weakest

    judged = {"per_prompt": [
        {"id": "a", "task": "t", "prompt": "Won.", "points": 1.0, "score": 9},
        {"id": "b", "task": "t", "prompt": "Lost.", "points": 0.0, "score": 2},
        {"id": "c", "task": "t", "prompt": "Tied.", "points": 0.5, "score": None},
        {"id": "d", "task": "t", "prompt": "Only scored.", "points": None, "score": 4},
        {"id": "e", "task": "t", "prompt": "Unread.", "points": None, "score": None}]}
    facts = {"student_version": 2, "answers": [
        {"id": "q1", "task": "shop", "question": "When?", "facts": [["1987"], ["Malvik"]],
         "distilled": "In 1987."},
        {"id": "q2", "task": "shop", "question": "Lost.", "facts": [["9:30"]], "distilled": "At nine."}]}
    weak = judged_weak(judged, "smol") + facts_weak(facts)
    got = weakest(weak, 10)
    assert [(w.prompt, w.badness) for w in got] == [("Lost.", 0.0), ("Only scored.", 1 / 3), ("Tied.", 0.5),
                                                    ("When?", 0.5)]  # won and unread left out, "Lost." once
    assert got[1].why == "judged by smol: score 4/10" and got[3].why == "gave 50% of the facts"
    assert [w.prompt for w in weakest(weak, 2)] == ["Lost.", "Only scored."]
    assert latest_version({"smol": {"0": {}, "1": {}}}, [facts]) == 2 and latest_version({}, []) is None


def test_failures_need_a_judged_or_fact_scored_version(tmp_path):
    from backpack.errors import InputError
    from backpack.run.synthesize import failure_seeds

    cfg = validate_config({"name": "syn", "storage": {"path": str(tmp_path)}, "teachers": [{"name": "t"}],
                           "prompts": {"path": "synthesized"}, "synthesis": {"source": "failures"}})
    with pytest.raises(InputError, match="no judged or fact-scored student version: run `backpack eval"):
        failure_seeds(cfg)
    (cfg.run_dir / "eval").mkdir(parents=True)
    (cfg.run_dir / "eval" / "facts-questions.json").write_text(json.dumps({"student_version": 1, "answers": [
        {"id": "q1", "task": "shop", "question": "When did it open?", "facts": [["1987"]], "distilled": "1987"}]}))
    with pytest.raises(InputError, match="version 1 of run 'syn' has no .* prompt it did badly on"):
        failure_seeds(cfg)
    (cfg.run_dir / "eval" / "judge-smol.json").write_text(json.dumps({"1": {"per_prompt": [
        {"id": "p1", "task": "general", "prompt": "Name a planet.", "points": 0.0, "score": 1}]}}))
    assert [(s.id, s.task, s.text) for s in failure_seeds(cfg)] == [("p1", "general", "Name a planet.")]


def test_evol_requests_rewrite_kept_prompts_each_way_and_a_reply_is_one_prompt():
    kept = [("Name a red fruit.", "fruit"), ("Explain rain.", "weather"), ("Write a limerick.", "poems")]
    got = build_evol_requests(2, 5, 3, kept, ["deepen", "constrain"], seed=1)
    assert got == build_evol_requests(2, 5, 3, kept, ["deepen", "constrain"], seed=1)
    assert [r.index for r in got] == [5, 6, 7] and sorted(r.parent for r in got) == sorted(t for t, _ in kept)
    assert [r.evolution for r in got] == ["deepen", "constrain", "deepen"]
    for r in got:
        text = r.messages[0]["content"]
        assert r.parent in text and EVOLUTIONS[r.evolution] in text and r.task == dict(kept)[r.parent]
    assert len(build_evol_requests(1, 0, 9, kept, ["deepen"], seed=1)) == 3  # never more than there are
    assert parse_rewrite("Rewritten task: Explain why rain falls in drops.") == ["Explain why rain falls in drops."]
    assert parse_rewrite("1. Name three red fruits.\n2. Name a fruit.") == ["Name three red fruits."]
    assert parse_rewrite("") == []


def test_a_round_mixes_new_requests_and_rewrites_once_prompts_are_kept(tmp_path):
    from backpack.run.synthesize import _Source

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"prompt": s.text}) + "\n" for s in SEEDS))
    cfg = validate_config({"name": "syn", "teachers": [{"name": "t"}], "prompts": {"path": "synthesized"},
                           "synthesis": {"seeds": str(seeds), "requests_per_round": 8, "evolve_fraction": 0.25}})
    source = _Source(cfg)
    assert [r.parent for r in source.requests(1, [])] == [""] * 8  # nothing kept yet: nothing to rewrite
    mixed = source.requests(2, [("Name a red fruit.", "default")] * 3)
    assert [bool(r.parent) for r in mixed] == [False] * 6 + [True] * 2
    assert source.candidates(mixed[-1], "New task: Name two red fruits and say which is sweeter.") == [
        "Name two red fruits and say which is sweeter."]
    assert source.candidates(mixed[0], "1. Name a blue fish.\n2. Name a green bird.") == [
        "Name a blue fish.", "Name a green bird."]


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
