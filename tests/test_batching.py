"""The server's batch engine: rows join a running batch and leave it as they finish, and each answers as it
would alone (greedy token for token, seeded sampling draw for draw); a cancelled row leaves at once."""

import threading
import time

import pytest

from backpack.config import StudentConfig
from backpack.core.chat import encode_chat
from backpack.core.types import DecodingParams
from backpack.serve.batching import BatchEngine, Job
from backpack.serve.generation import generate
from backpack.student.registry import load_version
from backpack.teachers.hf import HFTeacher

PROMPTS = ["Tell me about Mars.", "Hi", "Write a long poem about the sea, the wind and the stars at night.",
           "2+2?", "Name three colours.", "What is a cat?"]


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    ap = load_version(None, StudentConfig(base=tiny_model_dir, mode="full"), merge=True)
    return HFTeacher.from_model("s", ap.model, ap.tokenizer, fingerprint="s")


def slow(token):  # a client reading slowly keeps its row in the batch long enough for others to join
    time.sleep(0.003)


def run(engine, jobs, stagger=0.02):
    for j in jobs:
        engine.submit(j)
        time.sleep(stagger)
    for j in jobs:
        assert j.done.wait(60) and j.error is None


def test_rows_join_and_leave_and_answer_as_alone(gen):
    ids = [encode_chat(gen.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    decodings = [DecodingParams(max_new_tokens=n) for n in (20, 5, 30, 12, 20, 8)]
    sampled = DecodingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=11)
    alone = [generate(gen, i, d)[0] for i, d in zip(ids, decodings)]
    engine = BatchEngine(gen, max_batch=4)
    jobs = [Job(i, d, on_token=slow) for i, d in zip(ids, decodings)]
    twins = [Job(ids[0], sampled, on_token=slow), Job(ids[3], sampled, on_token=slow)]
    run(engine, jobs + twins)
    assert [j.tokens for j in jobs] == alone
    assert 1 < engine.widest <= 4 and engine.steps < sum(len(t) for t in alone)  # shared forward passes
    again = Job(ids[0], sampled)
    run(engine, [again])
    assert again.tokens == twins[0].tokens  # a seeded draw does not depend on what it was batched with
    assert all(j.finish in ("stop", "length") for j in jobs)


def test_a_cancelled_row_leaves_and_the_others_go_on(gen):
    ids = [encode_chat(gen.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS[:3]]
    engine = BatchEngine(gen, max_batch=8)
    long = DecodingParams(max_new_tokens=200)
    started = threading.Event()
    victim = Job(ids[0], long, on_token=lambda t: (started.set(), slow(t)))
    others = [Job(i, DecodingParams(max_new_tokens=10), on_token=slow) for i in ids[1:]]
    engine.submit(victim)
    assert started.wait(30)
    for j in others:
        engine.submit(j)
    victim.cancel.set()
    assert victim.done.wait(30) and len(victim.tokens) < 200
    for j in others:
        assert j.done.wait(30) and j.error is None
    assert [j.tokens for j in others] == [generate(gen, i, DecodingParams(max_new_tokens=10))[0] for i in ids[1:]]
