"""Curation of synthesized prompts: near-duplicates on a labelled set (recall and precision printed), the
held-out leak check, the refusal and format filters, and a funnel that adds up."""

import json
import random

from backpack.data.curation import FILTERS, Filters, clean, curate, funnel_lines, trim_question

from conftest import EXAMPLES

RECORDS = [json.loads(line) for line in (EXAMPLES / "prompts.jsonl").read_text().splitlines()]
HAND_WRITTEN = [r["prompt"] for r in RECORDS if "prompt" in r]


def _variant(text: str, rng: random.Random) -> str:
    """A near-duplicate as a teacher writes one: the same request with a small edit."""
    words = text.rstrip("?.!").split()
    kind = rng.randrange(4)
    if kind == 0:
        return "Please " + text[0].lower() + text[1:]
    if kind == 1:
        return text.upper().rstrip("?.!") + " ?"
    if kind == 2 and len(words) > 4:
        i = rng.randrange(1, len(words))
        return " ".join(words[:i] + ["briefly"] + words[i:]) + text[-1]
    return text.rstrip("?.!") + ", in simple terms" + (text[-1] if text[-1] in "?.!" else "")


def test_near_duplicates_on_a_labelled_set():
    rng = random.Random(0)
    originals = [p for p in HAND_WRITTEN if len(p) >= 30][:80]
    variants = [_variant(p, rng) for p in originals]
    # the labelled set: every original once, then its variant (a duplicate); the other hand-written prompts,
    # all distinct requests, are the negatives
    negatives = [p for p in HAND_WRITTEN if p not in originals]
    got = curate(originals + negatives + variants)
    flagged = {r.index for r in got.rejected if r.reason in ("exact", "near")}
    duplicates = set(range(len(originals) + len(negatives), len(originals) + len(negatives) + len(variants)))
    recall = len(flagged & duplicates) / len(duplicates)
    precision = len(flagged & duplicates) / max(1, len(flagged))
    print(f"near-duplicates: recall {recall:.3f}, precision {precision:.3f} "
          f"({len(duplicates)} duplicates among {len(originals) + len(negatives) + len(variants)} prompts)")
    assert recall >= 0.9 and precision >= 0.95
    # each flagged variant names the prompt it duplicates
    for r in got.rejected:
        if r.index in duplicates and r.reason in ("exact", "near"):
            assert r.duplicate_of == clean(originals[r.index - len(originals) - len(negatives)])


def test_a_paraphrase_of_a_heldout_prompt_is_rejected_as_a_leak_and_seeds_are_not_repeated():
    held = ["Explain how a refrigerator keeps food cold."]
    seeds = ["Write a haiku about a train station at dawn."]
    got = curate(["Please explain how a refrigerator keeps food cold.",
                  "Write a haiku about a train station at dawn!",
                  "Describe the water cycle to a ten-year-old.",
                  # a held-out prompt copied, then continued at length: its Jaccard is low, it still leaks
                  "Explain how a refrigerator keeps food cold. This is a classic question about heat pumps, "
                  "compressors, refrigerants and the way heat moves from the inside of the box to the kitchen."],
                 seeds=seeds, heldout=held)
    reasons = {r.index: (r.reason, r.duplicate_of) for r in got.rejected}
    assert reasons == {0: ("heldout", held[0]), 1: ("seed", seeds[0]), 3: ("heldout", held[0])}
    assert got.texts == ["Describe the water cycle to a ten-year-old."]


def test_every_filter_gives_its_reason_and_the_funnel_adds_up():
    candidates = [
        "",                                                     # format: empty
        "Why?",                                                 # format: too short
        "1. Name a planet.\n2. Name a star.\n3. Name a moon.",  # format: a list pasted as one
        "I'm sorry, but I cannot write more prompts.",          # refusal
        "Here are some new prompts for you.",                   # refusal (a comment, not a prompt)
        "The weather was lovely yesterday afternoon.",          # question: not a request
        "2. What is the boiling point of water at sea level?",  # kept, numbering stripped
        "what is the boiling point of water at sea level",      # exact duplicate
        "What is the boiling point of water at sea level, roughly?",  # near duplicate
        "Suggest three names for a bakery run by cats.",        # kept
        "x" * 2000 + "?",                                       # format: too long
    ]
    got = curate(candidates, filters=Filters(max_chars=1000))
    assert got.texts == ["What is the boiling point of water at sea level?",
                         "Suggest three names for a bakery run by cats."]
    by_index = {r.index: r.reason for r in got.rejected}
    assert by_index == {0: "format", 1: "format", 2: "format", 3: "refusal", 4: "refusal", 5: "question",
                        7: "exact", 8: "near", 10: "format"}
    assert len(got.kept) + len(got.rejected) == len(candidates)
    stages = dict(got.funnel)
    assert stages["generated"] == len(candidates) and got.funnel[-1][1] == len(got.kept)
    assert [s for s, _ in got.funnel][1:] == [f for f in FILTERS if f not in ("topic", "judge")]
    assert sum(got.counts().values()) == len(candidates) - len(got.kept)
    assert funnel_lines(got.funnel)[1].strip() == "format: 7  (-4)"


def test_a_judge_threshold_rejects_low_or_missing_scores():
    got = curate(["Name a red fruit.", "Name a green vegetable.", "Name a blue flower."],
                 filters=Filters(min_judge_score=5), judge_scores=[7, 3, None])
    assert got.texts == ["Name a red fruit."] and {r.reason for r in got.rejected} == {"judge"}
    assert got.funnel[-1] == ("judge", 1)


def test_a_question_about_something_else_is_off_topic_and_a_written_answer_is_trimmed():
    passage = "The Pellucid support line is staffed on Saturdays from 10:00 to 13:00."
    candidates = [trim_question('Can I phone the support line on a Saturday?" Yes, you can.'),
                  "What is the capital of Peru?", "When is it open?"]
    assert candidates[0] == "Can I phone the support line on a Saturday?"
    got = curate(candidates, references=[passage] * 3)
    assert got.texts == candidates[:1]
    assert [(r.index, r.reason) for r in got.rejected] == [(1, "topic"), (2, "topic")]
    assert ("topic", 1) in got.funnel and got.funnel[-1] == ("near", 1)
    assert trim_question("Name a planet.") == "Name a planet."
