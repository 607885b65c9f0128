"""The hf teacher, in-process, on the real SmolLM2-135M-Instruct and on a tiny random Llama directory."""

import pytest

from backpack.config import TeacherConfig
from backpack.core.schema import DATASET_SCHEMA, queries_to_table
from backpack.core.types import DecodingParams, Query
from backpack.errors import ModelNotFoundError
from backpack.teachers.hf import HFTeacher
from backpack.teachers.loader import resolve_model


@pytest.fixture(scope="module")
def smol(smol_dir):
    return HFTeacher(TeacherConfig(name="smol", threads=2, batch_size=4))


def ask(teacher, prompts, **dec):
    qs = [Query(messages=[{"role": "user", "content": p}], decoding=DecodingParams(**dec)) for p in prompts]
    return qs, teacher.generate(queries_to_table(qs)).to_pylist()


def test_greedy_answers_are_deterministic_and_complete(smol):
    qs, rows = ask(smol, ["What is the capital of France?", "Say hello."], max_new_tokens=24)
    _, again = ask(smol, ["What is the capital of France?", "Say hello."], max_new_tokens=24)
    assert [r["text"] for r in rows] == [r["text"] for r in again]
    assert [r["query_id"] for r in rows] == [q.id for q in qs]
    for r in rows:
        assert r["status"] == "ok" and r["text"].strip() and r["finish_reason"] in ("stop", "length")
        assert 0 < r["completion_tokens"] <= 24 and r["prompt_tokens"] > 0
        assert r["model_fingerprint"].startswith("gguf-sha256:") and r["teacher"] == "smol"
        assert smol.tokenizer.decode(r["token_ids"], skip_special_tokens=True) == r["text"]
    assert "Paris" in rows[0]["text"]


def test_batching_does_not_change_greedy_answers(smol):
    prompts = ["Name a fruit.", "What is 3 plus 4?", "Write one word about the sea."]
    _, batched = ask(smol, prompts, max_new_tokens=12)
    singles = [ask(smol, [p], max_new_tokens=12)[1][0]["text"] for p in prompts]
    assert [r["text"] for r in batched] == singles  # left padding is right


def test_top_k_logprobs(smol):
    _, rows = ask(smol, ["Count from one to five."], max_new_tokens=10, logprobs=3)
    r = rows[0]
    n = r["completion_tokens"]
    assert len(r["token_logprobs"]) == len(r["top_ids"]) == len(r["top_logprobs"]) == n
    assert all(len(k) == 3 for k in r["top_ids"])
    for tok, chosen, ids, lps in zip(r["token_ids"], r["token_logprobs"], r["top_ids"], r["top_logprobs"]):
        assert ids[0] == tok and chosen == pytest.approx(lps[0], abs=1e-5)   # greedy picks the top token
        assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)


def test_sampling_n_and_seed(smol):
    dec = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95, n=3, seed=7)
    _, a = ask(smol, ["Tell me a short joke."], **dec)
    _, b = ask(smol, ["Tell me a short joke.", "Another prompt in the same batch."], **dec)
    assert [r["sample_index"] for r in a] == [0, 1, 2]
    assert [r["text"] for r in a] == [r["text"] for r in b[:3]]   # seeded: independent of batch mates
    assert len({r["text"] for r in a}) > 1


def test_prompt_longer_than_context_fails_that_query_only(tiny_model_dir):
    t = HFTeacher(TeacherConfig(name="tiny", model=tiny_model_dir))
    assert t.context == 256 and t.resolved.fingerprint.startswith("dir-sha256:")
    _, rows = ask(t, ["word " * 400, "short"], max_new_tokens=8)
    assert rows[0]["status"] == "failed" and "exceeds the model context of 256" in rows[0]["error"]
    assert rows[1]["status"] == "ok" and rows[1]["completion_tokens"] > 0


def test_output_schema(tiny_model_dir):
    t = HFTeacher(TeacherConfig(name="tiny", model=tiny_model_dir))
    out = t.generate(queries_to_table([Query(messages=[{"role": "user", "content": "x"}],
                                             decoding=DecodingParams(max_new_tokens=4))]))
    assert out.schema.equals(DATASET_SCHEMA, check_metadata=False)


def test_gguf_conversion_is_cached(smol_dir):
    import time

    t0 = time.perf_counter()
    again = resolve_model("default")
    assert again.path == smol_dir and (time.perf_counter() - t0) < 10  # no second conversion


def test_missing_models_are_clear(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_model("no-such-org/no-such-model")


PROMPTS = ["What is the capital of France?", "Say hi.", "Write two sentences about rivers and lakes.", "Name a fruit."]


def _both_ways(teacher, p: DecodingParams, seed=None, prefill_rows: int = 8, share_prefix: bool = True, ids=None):
    """decode_batch and transformers' generate on the same left-padded batch (`ids`: encoded prompts; default
    PROMPTS as user messages)."""
    import torch

    from backpack.teachers.decode import decode_batch, generate_batch, left_pad

    if ids is None:
        ids = [teacher._encode(Query(messages=[{"role": "user", "content": x}], decoding=p)) for x in PROMPTS]
    pad = teacher.tokenizer.pad_token_id
    x, m = left_pad(ids, pad)
    with torch.inference_mode():
        if seed is not None:
            torch.manual_seed(seed)
        ours = decode_batch(teacher.model, x, m, p, teacher.stop_ids, prefill_rows, share_prefix)
        theirs = generate_batch(teacher.model, x, m, p, teacher.stop_ids, pad)
    return ours, theirs


@pytest.mark.parametrize("repetition_penalty,prefill_rows", [(1.0, 2), (1.3, 8)])
def test_row_dropping_decode_matches_generate_token_for_token(smol, repetition_penalty, prefill_rows):
    """Our loop (rows leave the batch when they stop) gives transformers' greedy answers exactly, with the same
    raw logprobs; some rows stop long before others, so rows really are dropped mid-batch. With prefill_rows=2 the
    prompts (of unsorted lengths) are prefilled in two groups of their own widths whose caches are joined."""
    assert smol.row_dropping
    ours, theirs = _both_ways(smol, DecodingParams(max_new_tokens=40, logprobs=3,
                                                   repetition_penalty=repetition_penalty), prefill_rows=prefill_rows)
    assert ours.tokens == theirs.tokens and ours.stopped == theirs.stopped
    assert any(ours.stopped) and len({len(t) for t in ours.tokens}) > 1
    for a, b in zip(ours.chosen, theirs.chosen):
        assert a == pytest.approx(b, abs=2e-3)
    assert [[ids[0] for ids in row] for row in ours.top_ids] == [[ids[0] for ids in row] for row in theirs.top_ids]


def test_a_prompt_prefix_shared_by_a_prefill_group_is_forwarded_once(smol):
    """The prompts all begin with the chat template's default system prompt: decode_batch forwards it once per
    prefill group instead of once per prompt, and answers exactly as it does when every prompt is forwarded
    whole (and as `generate` does, tested above)."""
    import backpack.teachers.prefill as prefill

    positions = []
    hook = smol.model.register_forward_pre_hook(lambda _, args, kwargs: positions.append(kwargs["input_ids"].numel()),
                                                with_kwargs=True)
    p = DecodingParams(max_new_tokens=12, logprobs=2)
    try:
        shared, _ = _both_ways(smol, p, prefill_rows=4)
        with_sharing, positions[:] = sum(positions), []
        whole, _ = _both_ways(smol, p, prefill_rows=4, share_prefix=False)
        without = sum(positions)
    finally:
        hook.remove()
    # generate's positions are in both sums alike; the prefix (24 tokens) is forwarded once, not 4 times
    assert without - with_sharing >= 3 * prefill.MIN_SHARED_PREFIX
    assert shared.tokens == whole.tokens and shared.stopped == whole.stopped
    for a, b in zip(shared.chosen, whole.chosen):
        assert a == pytest.approx(b, abs=2e-3)


def test_sliding_window_models_are_told_apart():
    """A sliding window counts cache columns, so those models keep plain left padding (no shared prefix)."""
    from transformers import LlamaConfig, Qwen2Config

    from backpack.teachers.prefill import _windowed

    assert not _windowed(LlamaConfig())
    assert not _windowed(Qwen2Config(use_sliding_window=False))
    assert _windowed(Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=0))


def test_row_dropping_decode_samples_n_per_prompt_reproducibly(smol):
    p = DecodingParams(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.9, n=2, logprobs=2)
    first, _ = _both_ways(smol, p, seed=7)
    again, _ = _both_ways(smol, p, seed=7)
    assert len(first.tokens) == 2 * len(PROMPTS) and first.tokens == again.tokens
    assert first.tokens[0] != first.tokens[1] or first.tokens[2] != first.tokens[3]  # two draws per prompt
    assert all(len(c) == len(t) for c, t in zip(first.chosen, first.tokens))


def test_row_dropping_decode_of_a_sliding_window_model_matches_generate():
    """A sliding-window model (Qwen2, window 4, prompts longer than that) decodes exactly as generate does: our
    joined full-length cache still attends within the window (the masks do it)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from backpack.teachers.decode import decode_batch, generate_batch

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    model = Qwen2ForCausalLM(cfg).eval()
    x = torch.tensor([[0, 0, 5, 6, 7, 2, 3], [8, 9, 10, 11, 12, 2, 3], [0, 13, 14, 15, 16, 2, 3]])
    m = (x != 0).long()
    p = DecodingParams(max_new_tokens=12)
    with torch.inference_mode():
        ours = decode_batch(model, x, m, p, {1}, prefill_rows=1)
        theirs = generate_batch(model, x, m, p, {1}, 0)
    assert ours.tokens == theirs.tokens and all(len(t) == 12 for t in ours.tokens)


def test_prepacked_weights_answer_as_the_plain_model(smol):
    """A teacher loaded from its config has its linear layers prepacked for oneDNN (CPU, float32) and gives the
    greedy answers of the same model with PyTorch's own matmul, logprobs equal up to float rounding."""
    from torch import nn

    from backpack.teachers.packed import PackedLinear

    plain = HFTeacher(TeacherConfig(name="plain", threads=2, batch_size=4, prepack_weights=False))
    assert plain.packed_layers == 0 and smol.packed_layers == 30 * 7 + 1   # q k v o gate up down per layer + lm head
    assert not any(type(m) is nn.Linear for m in smol.model.modules())
    assert sum(isinstance(m, PackedLinear) for m in smol.model.modules()) == smol.packed_layers
    assert smol.info()["packed_layers"] == smol.packed_layers
    _, packed = ask(smol, PROMPTS, max_new_tokens=24, logprobs=2)
    _, reference = ask(plain, PROMPTS, max_new_tokens=24, logprobs=2)
    assert [r["token_ids"] for r in packed] == [r["token_ids"] for r in reference]
    for a, b in zip(packed, reference):
        assert a["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=1e-3)


def test_a_packed_linear_computes_what_the_linear_did():
    import torch
    from torch import nn

    from backpack.teachers.packed import PackedLinear, pack_linears

    torch.manual_seed(0)
    lin = nn.Linear(48, 80)
    packed = PackedLinear(lin)
    with torch.inference_mode():
        for x in (torch.randn(5, 48), torch.randn(2, 3, 48), torch.randn(48, 7).t()):  # 2-D, 3-D, not contiguous
            assert torch.allclose(packed(x), lin(x), atol=1e-5)
    assert not list(packed.parameters()) and not packed.state_dict()  # inference only: nothing to train or save

    class Scaled(nn.Linear):  # a subclass computes something else: left alone
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), Scaled(8, 8))
    assert pack_linears(model) == 1 and isinstance(model[0], PackedLinear) and type(model[2]) is Scaled
    half = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    assert pack_linears(half) == 0 and type(half[0]) is nn.Linear  # float32 only


@pytest.mark.parametrize("keep,rows", [([0, 2, 5, 6], 7), ([3], 4), ([0, 1, 2], 3), ([1, 2, 4, 7, 8, 9], 10)])
def test_dropping_rows_moves_only_the_rows_that_must_move(keep, rows):
    """The decode loop drops stopped rows by moving rows from the tail into their places, in place: the kept rows
    and their cache columns come out as indexing would give them, in the order `refill_order` says."""
    import torch

    from backpack.teachers.kvcache import GrowingLayer, refill_order

    order = refill_order(keep, rows)
    assert sorted(order) == keep
    assert all(j == i or j >= len(keep) for i, j in enumerate(order))  # a place's row never moved before it is read
    keys, values = torch.randn(rows, 2, 9, 4), torch.randn(rows, 2, 9, 4)
    layer = GrowingLayer(keys.clone(), values.clone(), length=6)
    layer.keep_rows(order)
    assert torch.equal(layer.keys, keys[order, :, :6]) and torch.equal(layer.values, values[order, :, :6])
    layer.update(torch.ones(len(keep), 2, 1, 4), torch.ones(len(keep), 2, 1, 4))  # the next column still fits
    assert layer.keys.shape == (len(keep), 2, 7, 4) and torch.equal(layer.keys[:, :, :6], keys[order, :, :6])


def test_prompts_of_two_system_prompts_share_each_prefix_once_per_class(smol):
    """Prefill groups are cut within a class of prompts that begin alike, so two system prompts in one batch
    never land in one group; a class spanning several groups forwards its shared prefix once. Same answers as
    forwarding every prompt whole, and as `generate`."""
    from backpack.teachers.prefill import _classes, _shared_prefix, prefill_order

    persona = "You are Pellucid's repair assistant. Answer in one short sentence, naming the part you mean."
    questions = ["What is a derailleur?", "Why do chains squeak?", "How do I fix a flat tyre?"]
    messages = [[{"role": "system", "content": persona}, {"role": "user", "content": q}] for q in questions]
    messages += [[{"role": "user", "content": q}] for q in questions]  # the template's default system prompt
    p = DecodingParams(max_new_tokens=10, logprobs=2)
    ids = [smol._encode(Query(messages=m, decoding=p)) for m in messages]
    prompts = [ids[r] for r in prefill_order(ids)]
    assert [(c.start, c.stop) for c in _classes(prompts)] == [(0, 3), (3, 6)]
    positions = []
    hook = smol.model.register_forward_pre_hook(lambda _, args, kwargs: positions.append(kwargs["input_ids"].numel()),
                                                with_kwargs=True)
    try:
        shared, theirs = _both_ways(smol, p, prefill_rows=2, ids=ids)
        with_sharing, positions[:] = sum(positions), []
        whole, _ = _both_ways(smol, p, prefill_rows=2, share_prefix=False, ids=ids)
        without = sum(positions)
    finally:
        hook.remove()
    # generate's positions are in both sums alike; each class's prefix (the persona's, and the default one of 24
    # tokens) is forwarded once, not three times
    # (cut by groups alone, the class's third prompt would be forwarded whole: one prefix saved, not two)
    prefixes = [_shared_prefix(prompts[c]) for c in _classes(prompts)]
    assert sorted(prefixes)[0] == 24 and without - with_sharing == 2 * sum(prefixes)
    assert shared.tokens == whole.tokens == theirs.tokens and shared.stopped == whole.stopped
    for a, b in zip(shared.chosen, whole.chosen):
        assert a == pytest.approx(b, abs=2e-3)


def test_row_chunks_skip_only_columns_that_are_padding_for_every_row_of_the_run():
    """A decode step's attention runs over runs of neighbouring rows, each from the first column any of its rows
    needs (the token-for-token tests above run through them: 4 rows, one run each)."""
    from backpack.teachers.decode import _row_chunks

    assert _row_chunks([0, 0, 3, 5, 9, 9, 12], 3) == [(0, 3, 0), (3, 6, 5), (6, 7, 12)]
    assert _row_chunks([4, 2], 4) == [(0, 1, 4), (1, 2, 2)]
    assert _row_chunks([7, 0, 7], 1) == [(0, 3, 0)]


def test_prefill_groups_are_the_cheapest_cut_within_the_limits():
    """`_prefill_groups` cuts ascending prompt lengths into runs so that forwarded positions (each run padded to
    its longest) plus a forward's fixed cost are fewest, within the row and position limits: checked against every
    possible cut of small random classes."""
    import itertools
    import random

    import backpack.teachers.prefill as prefill

    def cost(runs, lengths):
        return sum((r.stop - r.start) * lengths[r.stop - 1] + prefill.PREFILL_CALL_POSITIONS for r in runs)

    def allowed(runs, lengths, max_rows):
        return all(r.stop - r.start <= max_rows and (r.stop - r.start == 1 or
                   (r.stop - r.start) * lengths[r.stop - 1] <= prefill.PREFILL_POSITIONS) for r in runs)

    rng = random.Random(0)
    for _ in range(60):
        n, max_rows = rng.randint(1, 8), rng.choice([1, 2, 3, 8])
        lengths = sorted(rng.choice([rng.randint(1, 40), rng.randint(300, 1200)]) for _ in range(n))
        runs = prefill._prefill_groups(lengths, max_rows)
        assert [r.start for r in runs] == [0] + [r.stop for r in runs[:-1]] and runs[-1].stop == n
        assert allowed(runs, lengths, max_rows)
        cuts = [[slice(a, b) for a, b in zip((0,) + c, c + (n,))]
                for k in range(n) for c in itertools.combinations(range(1, n), k)]
        assert cost(runs, lengths) == min(cost(c, lengths) for c in cuts if allowed(c, lengths, max_rows))
    assert prefill._prefill_groups([], 8) == []
    # similar lengths share a forward; a much longer prompt is not padded to by the others
    assert prefill._prefill_groups([10, 11, 11, 12, 90], 8) == [slice(0, 4), slice(4, 5)]


def test_kv_buffers_are_reused_from_batch_to_batch_with_the_same_answers(smol):
    """A `KVBuffers` keeps the KV cache's storage between batches: a second, smaller batch decodes in the same
    storage, and stale contents (NaN here, as fresh memory may hold) change no answer, since the padding columns are
    cleared. One that another batch holds is not shared: that batch gets buffers of its own."""
    import torch

    from backpack.teachers.decode import KVBuffers, decode_batch, left_pad

    p = DecodingParams(max_new_tokens=12, logprobs=2)
    more = PROMPTS + ["Why is the sky blue? Answer briefly.", "Hi.", "List three colours, then three animals.", "2+2?"]
    ids = [smol._encode(Query(messages=[{"role": "user", "content": x}], decoding=p)) for x in more]
    buffers = KVBuffers()

    def both(batch):
        x, m = left_pad(batch, smol.tokenizer.pad_token_id)
        with torch.inference_mode():
            # one prompt per prefill group: each row's cache begins at its own column, in the zeroed padding
            return decode_batch(smol.model, x, m, p, smol.stop_ids, prefill_rows=1, buffers=buffers), \
                decode_batch(smol.model, x, m, p, smol.stop_ids, prefill_rows=1)

    kept, fresh = both(ids)
    assert kept.tokens == fresh.tokens and kept.chosen == fresh.chosen
    storage = {slot: t.data_ptr() for slot, t in buffers._storage.items()}
    assert len(storage) == 2 * smol.model.config.num_hidden_layers and buffers.nbytes > 0
    for t in buffers._storage.values():
        t.fill_(float("nan"))
    # fewer prompts: the same storage serves them; runs of two rows of different widths attend over padding
    kept, fresh = both(ids[1:7])
    assert {slot: t.data_ptr() for slot, t in buffers._storage.items()} == storage
    assert kept.tokens == fresh.tokens and kept.chosen == fresh.chosen
    with buffers.lock:  # held by another batch: this one decodes in buffers of its own, leaving these alone
        for t in buffers._storage.values():
            t.fill_(7.0)
        kept, fresh = both(ids)
        assert all(bool((t == 7.0).all()) for t in buffers._storage.values())
    assert kept.tokens == fresh.tokens
