"""The commands a user runs beside a run (ingest, status, versions, promote, rollback), in-process against a
real Redis: the test's server, and the run's own embedded one started from its AOF when no run is live."""

import json
import os
import subprocess
import sys

import psutil
import pytest
import yaml

from backpack.cli import main
from backpack.core.schema import completions_to_table
from backpack.core.types import Completion, Query
from backpack.data.store import DatasetStore
from backpack.runtime.redis_server import RunKeys
from backpack.scheduling.intake import backlog
from backpack.student import checkpoints
from backpack.student.registry import Registry

from conftest import REPO, run_main

RUN = "ops"


def write_config(tmp_path, redis_url=None) -> str:
    """A run config with its storage under tmp_path; prompts.path and the teacher model are never read here."""
    data = {"name": RUN, "storage": {"path": str(tmp_path / "runs")}, "teachers": [{"name": "t"}],
            "prompts": {"path": str(tmp_path / "unused.jsonl"), "max_chars": 40, "default_task": "support"}}
    if redis_url:
        data["redis"] = {"url": redis_url}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def cli(capsys, *args):
    """`backpack ARGS` in-process: (exit status, stdout, stderr)."""
    done = run_main(capsys, *args)
    return done.returncode, done.stdout, done.stderr


def test_ingest_counts_accepted_duplicates_and_rejected(redis_server, tmp_path, capsys):
    cfg = write_config(tmp_path, redis_server.url)
    first = tmp_path / "first.jsonl"
    first.write_text('{"prompt": "What is Ray?"}\n')
    assert cli(capsys, "ingest", cfg, str(first))[:2] == \
        (0, f"pushed 1 prompt(s) to run {RUN}: 1 accepted, 0 duplicate(s) (already queued or answered), "
            "0 rejected\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([
        '{"prompt": "What is Ray?"}',                   # 1: queued by the first ingest: a duplicate
        "How do I reset my password?",                  # 2: a plain text line is a prompt
        "",                                             # blank lines are skipped
        '{"prompt": "broken',                           # 4: not JSON
        '{"messages": [{"role": "user", "content": "Hi there"}], "task": "greet"}',  # 5
        "How do I reset my password?",                  # 6: repeated in the input: a duplicate, queued once
        "x" * 41,                                       # 7: over prompts.max_chars
        '{"prompt": "Other", "id": "mine"}',            # 8
        '{"prompt": "Not the same", "id": "mine"}',     # 9: an id used for another prompt
    ]) + "\n")
    code, out, err = cli(capsys, "ingest", cfg, str(prompts))
    assert code == 2
    assert out == (f"pushed 8 prompt(s) to run {RUN}: 3 accepted, 2 duplicate(s) (already queued or answered), "
                   "3 rejected\n")
    lines = err.splitlines()
    assert len(lines) == 3 and "Traceback" not in err
    assert lines[0].startswith("  prompts.jsonl line 4: not valid JSON")
    assert lines[1] == "  prompts.jsonl line 7: prompt is 41 characters, over the limit of 40 (prompts.max_chars)"
    assert lines[2].startswith("  prompts.jsonl line 9: prompt id 'mine' was already used for another prompt")
    b = backlog(redis_server.url, RUN)
    assert (b.waiting, b.pushed, b.duplicates) == (4, 4, 2)
    # the good records carry the run's default task unless they name one
    entries = redis_server_client(redis_server).xrange(RunKeys(RUN)("intake"))
    assert [json.loads(f["query"])["task"] for _, f in entries] == ["support", "support", "greet", "support"]


def redis_server_client(server):
    from backpack.runtime.redis_server import connect

    return connect(server.url)


def test_ingest_lists_at_most_ten_rejections(redis_server, tmp_path, capsys):
    cfg = write_config(tmp_path, redis_server.url)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n' + '{"nope": 1}\n' * 13)
    code, out, err = cli(capsys, "ingest", cfg, str(bad))
    assert code == 2 and "1 accepted, 0 duplicate(s) (already queued or answered), 13 rejected" in out
    lines = err.splitlines()
    assert len(lines) == 11 and lines[0] == "  bad.jsonl line 2: unknown field(s) ['nope']"
    assert lines[-1] == "  ... and 3 more"
    assert backlog(redis_server.url, RUN).waiting == 1  # the good record is pushed all the same


def test_ingest_missing_or_empty_input_is_one_clear_error(redis_server, tmp_path, capsys):
    cfg = write_config(tmp_path, redis_server.url)
    code, out, err = cli(capsys, "ingest", cfg, str(tmp_path / "none.jsonl"))
    assert code == 2 and out == "" and err == f"backpack: error: prompt file not found: '{tmp_path}/none.jsonl'\n"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    code, _, err = cli(capsys, "ingest", cfg, str(empty))
    assert code == 2 and "holds no prompt records (the input is empty)" in err
    assert backlog(redis_server.url, RUN).pushed == 0


def test_ingest_from_stdin(redis_server, tmp_path):
    cfg = write_config(tmp_path, redis_server.url)
    proc = subprocess.run([sys.executable, "-m", "backpack.cli", "ingest", cfg, "-"], input="one\ntwo\n{bad\n",
                          capture_output=True, text=True, cwd=REPO, env=os.environ.copy(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "pushed 3 prompt(s) to run ops: 2 accepted" in proc.stdout and "1 rejected" in proc.stdout
    assert "stdin line 3: not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
    assert backlog(redis_server.url, RUN).waiting == 2


def publish_two(redis_url, tmp_path) -> Registry:
    """Two published student versions from a minimal checkpoint folder (files the registry copies)."""
    reg = Registry(redis_url, RUN, tmp_path / "runs" / RUN)
    ck = tmp_path / "ck"
    ck.mkdir()
    for name in (checkpoints.WEIGHTS, checkpoints.STATE):
        (ck / name).write_bytes(b"{}")
    reg.publish(ck, {"step": 20, "dataset_version": 3})
    reg.publish(ck, {"step": 40, "dataset_version": 5})
    return reg


def set_gate(reg: Registry, version: int, record: dict) -> None:
    if hasattr(reg, "set_gate"):
        reg.set_gate(version, record)
    else:  # a registry that keeps the gate's record in the version's metadata
        key = reg.keys("students", f"v{version}")
        meta = json.loads(reg.client.hget(key, "meta"))
        reg.client.hset(key, "meta", json.dumps({**meta, "gate": record}))


def test_status_shows_backlog_dataset_trainer_versions_and_server(redis_server, tmp_path, capsys):
    cfg = write_config(tmp_path, redis_server.url)
    run_dir = tmp_path / "runs" / RUN
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\n")
    assert cli(capsys, "ingest", cfg, str(prompts))[0] == 0
    code, out, _ = cli(capsys, "status", cfg, "--json")
    s = json.loads(out)
    assert code == 0 and s["backlog"]["waiting"] == 3 and s["backlog"]["pushed"] == 3
    assert (s["dataset"], s["trainer"], s["versions"], s["live_version"], s["server"]) == (None, None, 0, None, None)
    # a dataset, a trainer's metrics, versions, a live one and a server
    qs = [Query(messages=[{"role": "user", "content": f"q{i}"}]) for i in range(2)]
    DatasetStore(run_dir / "dataset").append(completions_to_table(
        qs, [Completion(qs[0].id, "t", text="ok", token_ids=[1]), Completion.failed(qs[1].id, "t", "boom")]))
    (run_dir / "train").mkdir(parents=True)
    (run_dir / "train" / "metrics.jsonl").write_text(
        json.dumps({"step": 5, "loss": 2.5, "time": 1.7e9}) + "\n" + json.dumps({"step": 10, "loss": 2.0, "time": 1.7e9 + 60})
        + "\n" + '{"step": 15, "lo')  # a line being written is skipped
    reg = publish_two(redis_server.url, tmp_path)
    reg.promote(2)
    redis_server_client(redis_server).hset(RunKeys(RUN).server,
                                           mapping={"url": "http://127.0.0.1:8123", "version": "2"})
    s = json.loads(cli(capsys, "status", cfg, "--json")[1])
    usage = s["dataset"].pop("teachers")
    assert s["dataset"] == {"path": str(run_dir / "dataset"), "version": 1, "rows": 2, "ok": 1, "failed": 1}
    assert [(u["teacher"], u["prompts"], u["answers"], u["failed"], u["completion_tokens"]) for u in usage] == \
        [("t", 2, 1, 1, 1)]
    assert s["trainer"] == {"step": 10, "time": 1.7e9 + 60, "loss": 2.0}
    assert (s["versions"], s["latest_version"], s["live_version"]) == (2, 2, 2)
    assert s["server"] == {"url": "http://127.0.0.1:8123", "version": 2}
    code, out, _ = cli(capsys, "status", cfg)
    assert code == 0
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert lines["backlog"] == "3 waiting, 0 in progress (pushed 3, 0 duplicate(s), answered 0, failed 0)"
    assert lines["dataset"] == "version 1: 2 row(s), 1 ok, 1 failed"
    assert lines["t"] == "1 answered, 1 failed, 0 from the ledger, 1 tokens, p50 0.00 s, spend 0.0000"
    assert lines["trainer"].startswith("step 10 at ") and lines["trainer"].endswith(", loss 2.0000)")
    assert (lines["versions"], lines["live"]) == ("2 (latest 2)", "version 2")
    assert lines["server"] == "http://127.0.0.1:8123 serving version 2"
    # the values start in one column
    assert len({line.index(v) for line, v in zip(out.splitlines(), lines.values())}) == 1


def test_versions_promote_and_rollback(redis_server, tmp_path, capsys):
    cfg = write_config(tmp_path, redis_server.url)
    code, out, _ = cli(capsys, "versions", cfg)
    assert (code, out) == (0, f"run {RUN} has no student versions yet\n")
    code, _, err = cli(capsys, "rollback", cfg)
    assert code == 2 and err == (f"backpack: error: nothing to roll back to in run {RUN!r}: no version has been "
                                 "promoted yet\n")
    reg = publish_two(redis_server.url, tmp_path)
    code, _, err = cli(capsys, "promote", cfg, "7")
    assert code == 2 and err == (f"backpack: error: no student version 7 in run {RUN!r} (its versions: 1, 2; "
                                 "0 is the base model)\n")
    assert reg.live() is None
    assert cli(capsys, "promote", cfg, "1")[:2] == (0, "version 1 is live (was none promoted: the base model)\n")
    code, _, err = cli(capsys, "rollback", cfg)
    assert code == 2 and "nothing to roll back to" in err and "no version was live before version 1" in err
    set_gate(reg, 2, {"metric": "nll", "candidate": 2.1, "live": 2.3456, "decision": "promoted", "reason": "better"})
    reg.promote(2, by="gate")
    code, out, _ = cli(capsys, "versions", cfg)
    assert code == 0
    head, v1, v2, foot = out.splitlines()
    assert head.split() == ["version", "step", "dataset", "created", "gate"]
    assert v1.split()[:3] == ["1", "20", "3"] and v1.endswith("—")
    assert v2.startswith("*") and v2.split()[1:4] == ["2", "40", "5"]
    assert v2.endswith("promoted: nll 2.1 vs live 2.346")
    assert foot == "* live: version 2"
    v = json.loads(cli(capsys, "versions", cfg, "--json")[1])
    assert v["live"] == 2 and [(m["version"], m["live"]) for m in v["versions"]] == [(1, False), (2, True)]
    assert v["versions"][1]["gate"]["decision"] == "promoted" and v["versions"][0].get("gate") is None
    assert cli(capsys, "promote", cfg, "2")[:2] == (0, "version 2 is already live\n")
    assert cli(capsys, "rollback", cfg)[:2] == (0, "version 1 is live again (was 2)\n")
    assert reg.live() == 1
    assert cli(capsys, "promote", cfg, "0")[:2] == (0, "version 0 is live (was 1)\n")
    assert reg.live() == 0
    by = [(e["version"], e["by"]) for _, e in reg.events() if e["type"] == "promoted"]
    assert by == [("1", "user"), ("2", "gate"), ("1", "user"), ("0", "user")]


def test_without_a_live_run_the_embedded_redis_keeps_what_was_ingested(tmp_path, capsys):
    """No redis.url and no run live: each command starts the run's embedded Redis from its AOF and stops it;
    what ingest pushed is there for the next command (and for the run, when it starts)."""
    cfg = write_config(tmp_path)
    code, _, err = cli(capsys, "status", cfg)
    assert code == 2 and f"run {RUN!r} has nothing at {tmp_path / 'runs' / RUN} yet" in err
    prompts = tmp_path / "p.txt"
    prompts.write_text("first\nsecond\n")
    code, out, _ = cli(capsys, "ingest", cfg, str(prompts))
    assert code == 0 and "2 accepted" in out
    redis_dir = tmp_path / "runs" / RUN / "redis"
    assert not (redis_dir / "endpoint.json").exists()  # the command's server is gone with it
    code, out, _ = cli(capsys, "ingest", cfg, str(prompts), "prompts.default_task=other")
    assert code == 0 and "2 accepted" in out  # another task: other prompts (overrides apply)
    code, out, _ = cli(capsys, "ingest", cfg, str(prompts))
    assert code == 0 and "0 accepted, 2 duplicate(s)" in out  # the second server remembered the first's pushes
    s = json.loads(cli(capsys, "status", cfg, "--json")[1])
    assert s["backlog"]["waiting"] == 4 and s["backlog"]["duplicates"] == 2
    assert cli(capsys, "versions", cfg)[1] == f"run {RUN} has no student versions yet\n"
    left = [p for p in psutil.process_iter(["cmdline"])
            if "redis-server" in " ".join(p.info["cmdline"] or []) and str(tmp_path) in " ".join(p.info["cmdline"])]
    assert not left  # each command stopped the server it started


@pytest.mark.parametrize("args", [["promote", "x"], ["status", "--nope"]])
def test_bad_arguments_exit_2(tmp_path, args):
    with pytest.raises(SystemExit) as e:
        main([args[0], write_config(tmp_path), *args[1:]])
    assert e.value.code == 2


def test_a_command_beside_a_live_run_attaches_to_its_redis(tmp_path):
    # `backpack eval` (and ingest, status...) during a live continual run: the run's own Redis, not a second
    # server on the same AOF folder, and the live run's endpoint.json stays
    from backpack.config import load_config
    from backpack.runtime.session import RunSession, attach_redis

    cfg = load_config(write_config(tmp_path), check_files=False)
    with RunSession(cfg) as live:
        url = live.redis_url
        endpoint = cfg.run_dir / "redis" / "endpoint.json"
        assert endpoint.exists()
        def redis_servers() -> int:
            return sum("redis-server" in " ".join(p.info["cmdline"] or [])
                       for p in psutil.process_iter(["cmdline"]))
        before = redis_servers()
        with attach_redis(cfg) as beside:
            assert beside == url and redis_servers() == before  # no second server on the run's AOF
        assert endpoint.exists()
