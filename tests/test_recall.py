"""Recall's pure core (BM25 ranking, packing into a token budget) and knowledge-pack validation. No Redis."""

import pytest

from backpack.config.knowledge import load_pack, parse_pack
from backpack.errors import ConfigError, InputError
from backpack.mental.bm25 import BM25, Item, pack_context, words

PASSAGES = {
    "refunds": "Refunds are paid to the original card within 30 days of the return being received.",
    "shipping": "Standard shipping takes 3 to 5 working days; express shipping arrives the next working day.",
    "warranty": "Every Zephyr kettle has a two year warranty covering the heating element and the lid hinge.",
    "loyalty": "Members of the Acorn Club earn one point per euro and get free express shipping.",
    "hours": "The support desk is open Monday to Friday from 8:00 to 18:00 Central European Time.",
}
# questions phrased unlike the passages, each with the passage that answers it
LABELLED = [
    ("How long until my money comes back after I send something back?", "refunds"),
    ("My Zephyr kettle lid broke after a year, is that covered?", "warranty"),
    ("When can I call support on a weekday?", "hours"),
    ("What do Acorn Club members get?", "loyalty"),
    ("How many working days does standard delivery take?", "shipping"),
    ("Is express shipping free for club members?", "loyalty"),
]


def items():
    return [Item(k, "passage", v, v) for k, v in PASSAGES.items()]


def test_words_lowercase_drop_stop_words_keep_numbers():
    assert words("What is the Refund policy for 30 days?") == ["refund", "policy", "30", "days"]


def test_bm25_ranks_the_answering_passage_first_for_most_questions():
    index = BM25(items())
    firsts = [index.rank(q)[0][0].id if index.rank(q) else None for q, _ in LABELLED]
    hits = sum(f == want for f, (_, want) in zip(firsts, LABELLED))
    assert hits >= 5, list(zip(firsts, [w for _, w in LABELLED]))
    assert index.rank("completely unrelated zebra") == []


def test_pack_context_never_exceeds_the_budget_and_skips_what_does_not_fit():
    count = lambda s: len(s.split())  # noqa: E731 - a whitespace "tokenizer"
    ranked = [it for it, _ in BM25(items()).rank("express shipping kettle warranty club")]
    for budget in (0, 5, 12, 20, 40, 200):
        r = pack_context("You are Acme's support agent.", ranked, budget, count)
        assert r.tokens <= budget and count(r.context) == r.tokens
        assert set(r.passage_ids) <= set(PASSAGES)
    r = pack_context("", ranked, 20, count)  # the best passage (17 words) fits, the next (16) would not
    assert len(r.passage_ids) == 1
    big = pack_context("persona " * 50, ranked, 30, count)  # a persona over the budget is left out
    assert "persona" not in big.context and big.passage_ids


def test_pack_context_checks_the_joined_text():
    # a counter that charges 5 tokens per join: parts fit one by one, the joined text would not
    count = lambda s: len(s.split()) + 5 * s.count("\n\n")  # noqa: E731
    ranked = [it for it, _ in BM25(items()).rank("shipping club express")]
    r = pack_context("Be kind.", ranked, 40, count)
    assert r.tokens <= 40


def test_pack_files_round_trip_and_every_problem_is_named(tmp_path):
    good = tmp_path / "pack.yaml"
    good.write_text("tasks:\n  support:\n    persona: Be calm.\n    passages:\n      - {id: a, text: Alpha.}\n"
                    "    experiences:\n      - {id: e1, question: \"Q?\", answer: \"A.\"}\n")
    pack = load_pack(good)
    assert [it.id for it in pack.tasks["support"].items()] == ["a", "e1"]
    bad = {"tasks": {"support": {"passages": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]},
                     "empty": {}, "typo": {"pasages": []}}}
    with pytest.raises(ConfigError) as e:
        parse_pack(bad, "bad.yaml")
    msg = str(e.value)
    assert "pasages" in msg  # an unknown field is named (reported before the other checks)
    del bad["tasks"]["typo"]
    with pytest.raises(ConfigError) as e:
        parse_pack(bad, "bad.yaml")
    assert "duplicate id 'a'" in str(e.value) and "tasks.empty: empty task" in str(e.value)
    with pytest.raises(ConfigError, match="the pack is empty"):
        parse_pack({"tasks": {}}, "empty.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("tasks: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pack(broken)
    with pytest.raises(InputError, match="not found"):
        load_pack(tmp_path / "missing.yaml")
