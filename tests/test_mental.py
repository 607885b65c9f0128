"""The Mental Process: the knowledge store through a real Redis, recall on the shipped pack (relevance, budget),
context distillation (the teacher sees the recalled context, the dataset records its ids and version, the
training text does not hold it), fact scoring, the commands' bad input, and an end-to-end tiny run."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from backpack.config import validate_config
from backpack.config.knowledge import Experience, Passage, load_pack, parse_pack
from backpack.core.chat import with_context
from backpack.core.schema import DATASET_SCHEMA
from backpack.data.grounding import grounding, keep_for_training
from backpack.data.store import DatasetStore
from backpack.errors import ConfigError, InputError
from backpack.eval.facts import fact_found, load_questions, normalise, score
from backpack.mental.recall import Recaller, TokenCounter
from backpack.mental.setup import check_budget
from backpack.mental.store import MentalStore, UnknownTaskError

from conftest import EXAMPLES, run_main

PACK = EXAMPLES / "mental" / "pellucid.yaml"
QUESTIONS = EXAMPLES / "mental" / "questions.jsonl"
PROMPTS = EXAMPLES / "mental" / "prompts.jsonl"


def small_pack():
    return parse_pack({"tasks": {"acme": {
        "persona": "You are Acme's calm support agent.",
        "passages": [{"id": "refunds", "text": "Refunds reach the original card 45 days after a return."},
                     {"id": "ship", "text": "Express shipping costs 7 euros and arrives the next working day."}],
        "experiences": [{"id": "ex-1", "question": "Can I return a used kettle?",
                         "answer": "Yes, within 45 days, and the refund reaches your card."}]}}}, "test")


# ---------------------------------------------------------------- the store (real Redis)


def test_store_round_trip_versions_and_history(redis_server, tmp_path):
    store = MentalStore(redis_server.url, "run-a")
    assert store.tasks() == {} and store.version("acme") == 0
    pack = small_pack()
    assert store.import_pack(pack) == {"acme": (1, True)}
    assert store.import_pack(pack) == {"acme": (1, False)}  # same content: no new version
    got, v = store.get("acme")
    assert v == 1 and got == pack.tasks["acme"]
    assert store.add("acme", passage=Passage(id="hours", text="The desk is open 7:45 to 18:15.")) == 2
    assert store.add("acme", experience=Experience(id="ex-2", question="Open on Sunday?", answer="No.")) == 3
    assert store.add("acme", persona="Be brief.") == 4
    with pytest.raises(InputError, match="already has an item with id 'hours'"):
        store.add("acme", passage=Passage(id="hours", text="again"))
    # every version stays readable: a dataset row's knowledge_version can always be looked up
    assert store.get("acme", 1)[0] == pack.tasks["acme"]
    now, v = store.get("acme")
    assert v == 4 and now.persona == "Be brief." and [p.id for p in now.passages] == ["refunds", "ship", "hours"]
    assert [h["version"] for h in store.history("acme")] == [1, 2, 3, 4]
    # export -> import elsewhere gives the same knowledge; other runs on the same server do not see it
    other = MentalStore(redis_server.url, "run-b")
    assert other.tasks() == {}
    other.import_pack(store.export())
    assert other.get("acme")[0] == now
    with pytest.raises(UnknownTaskError, match=r"no knowledge for task 'nope' \(tasks in the store: acme\)"):
        store.get("nope")
    with pytest.raises(UnknownTaskError, match="has no version 9"):
        store.get("acme", 9)


# ---------------------------------------------------------------- recall


@pytest.fixture(scope="module")
def count(smol_dir):
    return TokenCounter("default")


def shipped_recaller(redis_url, count, budget=256, max_items=3):
    store = MentalStore(redis_url, "shipped")
    store.import_pack(load_pack(PACK))
    return Recaller(store, budget, count, max_items)


@pytest.mark.parametrize("questions", [QUESTIONS, QUESTIONS.with_name("questions-48.jsonl")])
def test_recall_brings_the_answering_passage_first_for_most_shipped_questions(redis_server, count, questions):
    recaller = shipped_recaller(redis_server.url, count)
    labelled = [q for q in load_questions(questions) if q.passage]
    assert len(labelled) >= 20
    first = [recaller.recall(q.task, q.question)[0].passage_ids[:1] for q in labelled]
    hits = sum(f == [q.passage] for f, q in zip(first, labelled))
    assert hits / len(labelled) >= 0.75, [(q.id, q.passage, f) for f, q in zip(first, labelled)]


def test_recall_never_exceeds_the_budget(redis_server, count):
    questions = load_questions(QUESTIONS)
    for budget, items in ((16, 3), (48, 3), (120, 2), (256, 8)):
        recaller = shipped_recaller(redis_server.url, count, budget, items)
        for q in questions:
            r, version = recaller.recall(q.task, q.question)
            assert version == 1 and r.tokens == count(r.context) <= budget
            assert len(r.passage_ids) + len(r.experience_ids) <= items
    assert recaller.recall("no-such-task", "hello") is None


def test_a_passage_larger_than_the_budget_is_refused(count):
    pack = small_pack()
    with pytest.raises(ConfigError, match=r"passage 'ship' is \d+ tokens, larger than the recall budget of 12"):
        check_budget(pack, 12, count, "p.yaml")
    check_budget(pack, 64, count, "p.yaml")


def test_context_goes_before_the_prompts_own_system_text():
    user = [{"role": "user", "content": "Hi"}]
    assert with_context(user, None) == user
    assert with_context(user, "K") == [{"role": "system", "content": "K"}] + user
    sys_user = [{"role": "system", "content": "Be brief."}] + user
    assert with_context(sys_user, "K")[0] == {"role": "system", "content": "K\n\nBe brief."}


# ---------------------------------------------------------------- fact scoring


def test_fact_scoring_normalises_case_punctuation_and_thousands():
    assert normalise("The Skerry-7 costs 1,490 EUR!") == "the skerry 7 costs 1490 eur"
    assert fact_found("It is 1490 euros.", ("1,490 euros",))
    assert fact_found("open 7:45 till late", ("7:45",))
    assert not fact_found("it takes 145 days", ("45 days",))  # word boundaries: no partial numbers
    assert score("Ingrid founded it in 1987.", (("1987",), ("Ingrid Malvik", "Malvik"))) == 0.5
    assert score("nothing", (("1987",),)) == 0.0


def test_grounding_flags_claims_the_context_does_not_make():
    ctx = "The Skerry 7 costs 1490 euros and weighs 11.8 kg. It was designed by Ingrid Malvik in Varnholm."
    assert grounding("The Skerry 7 costs 1,490 euros.", ctx).grounded       # thousands separator
    g = grounding("It costs 1,290 euros and weighs 11.8 kg.", ctx)            # an invented price
    assert not g.grounded and g.unsupported == ("1290",) and g.supported == 1
    g = grounding("Yes. It was designed by Albrecht in Varnholm.", ctx)       # an invented name
    assert not g.grounded and g.unsupported == ("albrecht",)
    # sentence-initial capitals and "I" are no claims; an answer with no claim at all teaches nothing
    assert not grounding("Sure, I can help. Ask me anything.", ctx).grounded
    assert grounding("Sure! It weighs 11.8 kg.", ctx).grounded
    assert keep_for_training("Anything at all 42.", None) and keep_for_training("Anything at all 42.", "")


def test_grounded_only_training_rows_drop_ungrounded_answers_with_context():
    from backpack.data.splits import training_rows

    rows = [{"query_id": "a", "status": "ok", "text": "It costs 385 euros.", "context": "Kestrel: 385 euros."},
            {"query_id": "b", "status": "ok", "text": "It costs 999 euros.", "context": "Kestrel: 385 euros."},
            {"query_id": "c", "status": "ok", "text": "No context, no check 7.", "context": None},
            {"query_id": "d", "status": "error", "text": None, "context": "Kestrel: 385 euros."}]
    table = pa.Table.from_pylist(rows)
    assert training_rows(table, 0.0).column("query_id").to_pylist() == ["a", "b", "c"]
    assert training_rows(table, 0.0, grounded_only=True).column("query_id").to_pylist() == ["a", "c"]
    bad = {"name": "x", "teachers": [{"name": "t", "model": "m"}], "mental": {"train_on": "faithful"}}
    with pytest.raises(ConfigError, match="train_on"):
        validate_config(bad)


def test_questions_file_problems_are_listed(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "a?", "facts": ["x"]}\nnot json\n{"question": "", "facts": ["x"]}\n'
                   '{"question": "b?", "facts": []}\n{"question": "c?", "facts": ["x"], "colour": 1}\n')
    with pytest.raises(InputError) as e:
        load_questions(bad)
    msg = str(e.value)
    assert f"{bad}:2: not JSON" in msg and f"{bad}:3: 'question'" in msg and f"{bad}:4: 'facts'" in msg
    assert "unknown field(s) ['colour']" in msg
    assert len(load_questions(QUESTIONS)) == 24
    more = load_questions(QUESTIONS.with_name("questions-48.jsonl"))  # the same 24 first, then 24 more
    assert len(more) == 48 and [q.id for q in more[:24]] == [q.id for q in load_questions(QUESTIONS)]
    with pytest.raises(InputError, match="questions file not found"):
        load_questions(tmp_path / "none.jsonl")


def test_shipped_questions_are_phrased_unlike_the_training_prompts():
    prompts = {json.loads(line)["prompt"].strip().lower() for line in PROMPTS.read_text().splitlines()}
    assert not any(q.question.strip().lower() in prompts for q in load_questions(QUESTIONS))


# ---------------------------------------------------------------- old datasets


def test_shards_written_before_the_recall_columns_still_read(tmp_path):
    store = DatasetStore(tmp_path / "ds")
    store.append(DATASET_SCHEMA.empty_table())  # nothing: no version
    old_schema = pa.schema([f for f in DATASET_SCHEMA if f.name not in ("context", "recalled_ids",
                                                                         "knowledge_version")])
    row = {f.name: None for f in old_schema}
    row.update(query_id="q1", task="t", messages=[{"role": "user", "content": "hi"}], sample_index=0,
               status="ok", teacher="x", decoding={"max_new_tokens": 4, "temperature": 0.0, "top_k": 0,
                                                   "top_p": 1.0, "repetition_penalty": 1.0, "n": 1, "seed": None,
                                                   "logprobs": 0})
    from backpack.data.manifest import Manifest

    pq.write_table(pa.Table.from_pylist([row], schema=old_schema), tmp_path / "ds" / "shards" / "old.parquet")
    m = Manifest()
    m.add("shards/old.parquet", rows=1, ok=1, failed=0, teachers={"x": 1})
    store._write_manifest(m)
    t = store.read()
    assert t.num_rows == 1 and t.column("context").to_pylist() == [None]
    assert store.read(columns=["query_id", "recalled_ids"]).column("recalled_ids").to_pylist() == [None]


# ---------------------------------------------------------------- bad input through the commands


def mental_config(tmp_path, **mental):
    cfg = tmp_path / "cfg.yaml"
    data = {"name": "m", "storage": {"path": str(tmp_path / "runs")}, "teachers": [{"name": "t"}],
            "prompts": {"path": str(PROMPTS)}, "student": {"mode": "full"},
            "mental": {"path": str(PACK), **mental}}
    cfg.write_text(json.dumps(data))
    return cfg, data


def test_bad_packs_are_one_clear_message(tmp_path, smol_dir, capsys):
    from test_cli import assert_clear_error

    empty = tmp_path / "empty.yaml"
    empty.write_text("tasks: {}\n")
    dup = tmp_path / "dup.yaml"
    dup.write_text("tasks:\n  a:\n    passages:\n      - {id: x, text: one}\n      - {id: x, text: two}\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("tasks: [unclosed\n")
    lines = tmp_path / "lines.jsonl"
    lines.write_text('{"task": "a", "id": "x", "text": "one"}\n{"task": "a", "colour": "red"}\n{oops\n')
    for pack, fragment in ((empty, "the pack is empty"), (dup, "tasks.a: duplicate id 'x'"),
                           (broken, "not valid YAML"), (tmp_path / "none.yaml", "knowledge pack not found"),
                           (lines, "line 2: a record holds a persona"), (lines, "line 3: not JSON")):
        cfg, _ = mental_config(tmp_path, path=str(pack))
        assert_clear_error(run_main(capsys, "validate", str(cfg)), "mental.path", fragment)
    cfg, _ = mental_config(tmp_path, budget=16)
    assert_clear_error(run_main(capsys, "mental", "import", str(cfg), str(PACK)), "larger than the recall budget of 16")
    assert_clear_error(run_main(capsys, "generate", str(cfg)), "larger than the recall budget of 16")
    # prompts whose tasks have no knowledge at all: a mistyped task name, refused before any teacher loads
    cfg, _ = mental_config(tmp_path)
    assert_clear_error(run_main(capsys, "generate", str(cfg), f"prompts.path={EXAMPLES / 'prompts.jsonl'}"),
                       "no prompt's task has knowledge", "'general'", "['pellucid']")
    assert_clear_error(run_main(capsys, "eval", str(cfg), "--questions", str(tmp_path / "none.jsonl")),
                       "questions file not found")
    other = tmp_path / "other.jsonl"
    other.write_text('{"task": "pelucid", "question": "Who founded it?", "facts": ["Malvik"]}\n')
    assert_clear_error(run_main(capsys, "eval", str(cfg), "--questions", str(other)),
                       "questions name task(s) ['pelucid'] that have no knowledge")
    assert_clear_error(run_main(capsys, "mental", "import", str(cfg), str(dup)), "invalid knowledge pack",
                       "duplicate id 'x'")


def test_mental_commands_import_show_add_export(tmp_path, smol_dir, capsys):
    cfg, _ = mental_config(tmp_path)
    out = run_main(capsys, "mental", "import", str(cfg), str(PACK))
    assert out.returncode == 0 and "task pellucid: version 1" in out.stdout, out.stderr
    assert "unchanged" in run_main(capsys, "mental", "import", str(cfg), str(PACK)).stdout
    add = run_main(capsys, "mental", "add", str(cfg), "pellucid", "--id", "gift", "--passage",
                  "Pellucid gift cards are sold in steps of 25 euros.")
    assert add.returncode == 0 and "version 2" in add.stdout, add.stderr
    shown = json.loads(run_main(capsys, "mental", "show", str(cfg), "pellucid", "--json").stdout)
    assert shown["version"] == 2 and shown["passages"][-1]["id"] == "gift" and len(shown["history"]) == 2
    assert run_main(capsys, "mental", "show", str(cfg)).stdout.strip() == "pellucid: version 2"
    from test_cli import assert_clear_error

    assert_clear_error(run_main(capsys, "mental", "show", str(cfg), "pelucid"), "no knowledge for task 'pelucid'",
                       "pellucid")
    assert_clear_error(run_main(capsys, "mental", "add", str(cfg), "pellucid", "--id", "gift", "--passage", "x"),
                       "already has an item with id 'gift'")
    for suffix in (".yaml", ".json", ".jsonl"):  # every export form reads back as the same knowledge
        exported = tmp_path / f"out{suffix}"
        assert run_main(capsys, "mental", "export", str(cfg), str(exported)).returncode == 0
        again = load_pack(exported).tasks["pellucid"]
        assert again.passages[-1].text.startswith("Pellucid gift cards") and again.model_dump() == {
            k: v for k, v in shown.items() if k in ("persona", "passages", "experiences")}


# ---------------------------------------------------------------- end to end (tiny models, the shipped pack)


@pytest.mark.integration
def test_context_distillation_end_to_end_on_the_shipped_pack(ray_session, tiny_model_dir, tmp_path):
    """A tiny teacher answers the shipped prompts with recall; each row records what was recalled and the
    knowledge version; the training text is the prompt alone; a student trains; the four settings are scored."""
    from transformers import AutoTokenizer

    from backpack.eval.knowledge import evaluate_facts
    from backpack.run.generate import generate
    from backpack.run.train import train
    from backpack.student.examples import build_examples

    cfg = validate_config({
        "name": "cd", "storage": {"path": str(tmp_path)},
        "teachers": [{"name": "tiny", "model": tiny_model_dir, "batch_size": 8, "threads": 2}],
        "prompts": {"path": str(PROMPTS), "limit": 12, "default_task": "pellucid"},
        "decoding": {"max_new_tokens": 6, "logprobs": 2},
        "student": {"base": tiny_model_dir, "mode": "full"},
        "training": {"cpus_per_worker": 0.5, "batch_size": 4, "max_steps": 2, "checkpoint_every": 2, "top_k": 2,
                     "lr": 1e-3},
        "eval": {"heldout_fraction": 0.2, "max_new_tokens": 4},
        "mental": {"path": str(PACK), "budget": 192, "max_items": 2},
    })
    gen = generate(cfg)
    assert gen.ok_rows == 12 and gen.failed_rows == 0
    rows = DatasetStore(cfg.dataset_dir).read().to_pylist()
    pack = load_pack(PACK).tasks["pellucid"]
    texts = {it.id: it.text for it in pack.items()}
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for r in rows:
        assert r["knowledge_version"] == 1 and 1 <= len(r["recalled_ids"]) <= 2
        assert all(texts[i] in r["context"] for i in r["recalled_ids"]) and pack.persona in r["context"]
        assert len(tok(r["context"], add_special_tokens=False)["input_ids"]) <= 192
        assert [m["role"] for m in r["messages"]] == ["user"]  # the stored prompt is the prompt alone
        # the teacher read the context: its prompt was longer than the stored prompt alone
        alone = len(tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True))
        assert r["prompt_tokens"] > alone
    examples, _ = build_examples(rows, tok, 512, same_tokenizer=True, use_logprobs=True)
    for e, r in zip(examples, rows):
        text = tok.decode(e.input_ids)
        assert not any(texts[i] in text for i in r["recalled_ids"]) and pack.persona not in text
    res = train(cfg)
    assert res["versions"] == [1]
    out = evaluate_facts(cfg, str(QUESTIONS))
    accs = {s["key"]: s["accuracy"] for s in out["settings"]}
    assert set(accs) == {"base", "teacher", "distilled", "distilled_recall"}
    assert all(a is not None and 0.0 <= a <= 1.0 for a in accs.values())
    assert out["student_version"] == 1 and out["recall_hit_rate"] >= 0.7
    assert len(out["answers"]) == 24 and all(a["recalled"] for a in out["answers"])
    assert json.loads(open(out["path"]).read())["questions"] == 24


def test_student_served_with_recall(redis_server, tiny_model_dir, count):
    """mental.student_recall: the server puts the task's recalled knowledge in front of the request."""
    import asyncio

    import torch

    from backpack.config import ServeConfig, StudentConfig
    from backpack.serve.server import StudentServer

    store = MentalStore(redis_server.url, "served")
    store.import_pack(small_pack())
    recaller = Recaller(store, 64, count, 1)
    question = [{"role": "user", "content": "How long do refunds take?"}]

    async def ask(server, **extra):
        import aiohttp

        url = await server.start()
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{url}/v1/chat/completions",
                                     json={"messages": question, "max_tokens": 2, **extra}) as r:
                    return r.status, await r.json()
        finally:
            await server.stop()

    threads = torch.get_num_threads()
    try:
        student = StudentConfig(base=tiny_model_dir, mode="full")
        plain = asyncio.run(ask(StudentServer(student, ServeConfig(port=0, max_new_tokens=4))))
        server = StudentServer(student, ServeConfig(port=0, max_new_tokens=4), recall=recaller, default_task="acme")
        status, out = asyncio.run(ask(server))
        other = asyncio.run(ask(StudentServer(student, ServeConfig(port=0, max_new_tokens=4), recall=recaller,
                                              default_task="acme"), task="unknown-task"))
    finally:
        torch.set_num_threads(threads)
    assert plain[0] == status == other[0] == 200
    assert out["backpack"]["recalled"] == {"ids": ["refunds"], "knowledge_version": 1}
    assert out["usage"]["prompt_tokens"] > plain[1]["usage"]["prompt_tokens"]
    # a task without knowledge is answered as asked
    assert "recalled" not in other[1]["backpack"]
    assert other[1]["usage"]["prompt_tokens"] == plain[1]["usage"]["prompt_tokens"]
