"""The `backpack` command as a user runs it: exit codes, one clear message, no tracebacks."""

import json

import pytest

from backpack.core.schema import completions_to_table
from backpack.core.types import Completion, Query
from backpack.data.store import DatasetStore

from conftest import EXAMPLES, run_cli


def assert_clear_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in proc.stderr, proc.stderr


def test_bad_config_lists_every_problem(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: bad run\nteachers:\n  - name: a\n    replicas: -1\n    modle: x\nprompts: {path: nowhere.jsonl}\n")
    proc = run_cli("generate", str(cfg))
    assert_clear_error(proc, "name:", "teachers.0.replicas", "teachers.0.modle: unknown field", "3 problem(s)")


def test_missing_prompt_and_model_files(tmp_path):
    proc = run_cli("generate", str(EXAMPLES / "quickstart.yaml"), f"prompts.path={tmp_path}/none.jsonl",
                   f"teachers.0.model={tmp_path}/none.gguf")
    assert_clear_error(proc, "prompts.path: file not found", "teachers.0.model: file or directory not found")


def test_malformed_yaml_and_bad_override(tmp_path):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("name: [unclosed\n")
    assert_clear_error(run_cli("validate", str(cfg)), "(yaml): line")
    assert_clear_error(run_cli("validate", str(EXAMPLES / "quickstart.yaml"), "decoding.top_p=7"),
                       "decoding.top_p")


def test_unreachable_redis_is_one_clear_error(tmp_path):
    proc = run_cli("generate", str(EXAMPLES / "quickstart.yaml"), "redis.url=redis://127.0.0.1:1/0",
                   f"storage.path={tmp_path}")
    assert_clear_error(proc, "cannot reach Redis at redis://127.0.0.1:1/0")


def test_empty_prompt_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = run_cli("generate", str(EXAMPLES / "quickstart.yaml"), f"prompts.path={empty}", f"storage.path={tmp_path}")
    assert_clear_error(proc, "holds no prompts")


def test_validate_prints_resolved_config():
    proc = run_cli("validate", str(EXAMPLES / "quickstart.yaml"), "teachers.0.replicas=3")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["teachers"][0]["replicas"] == 3


def test_data_show_and_export(tmp_path):
    store = DatasetStore(tmp_path / "ds")
    qs = [Query(messages=[{"role": "user", "content": f"question {i}"}], task="demo") for i in range(3)]
    store.append(completions_to_table(qs, [Completion(qs[0].id, "t", text="an answer", token_ids=[1]),
                                           Completion(qs[1].id, "t", text="another", token_ids=[2]),
                                           Completion.failed(qs[2].id, "t", "too long")]))
    (tmp_path / "run").mkdir()
    (tmp_path / "ds").rename(tmp_path / "run" / "dataset")
    (tmp_path / "ds").symlink_to(tmp_path / "run" / "dataset")
    show = run_cli("data", "show", str(tmp_path / "run"), "--rows", "2")  # a run folder is accepted too
    assert show.returncode == 0, show.stderr
    assert "version 1, 1 shard(s), 3 row(s): 2 ok, 1 failed" in show.stdout and "question 0" in show.stdout
    failed = run_cli("data", "show", str(tmp_path / "ds"), "--failed")
    assert "too long" in failed.stdout and "an answer" not in failed.stdout
    out = tmp_path / "out.jsonl"
    exp = run_cli("data", "export", str(tmp_path / "ds"), "--format", "jsonl", "--out", str(out))
    assert exp.returncode == 0, exp.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows[:2]] == ["an answer", "another"] and rows[2]["status"] == "failed"
    assert_clear_error(run_cli("data", "show", str(tmp_path / "nope")), "no dataset")


@pytest.mark.integration
def test_generate_command_on_an_existing_cluster(ray_session, smol_dir, tmp_path):
    """`backpack generate` connecting to a running Ray cluster (the test session's), with an embedded Redis."""
    address = ray_session.get_runtime_context().gcs_address
    proc = run_cli("generate", str(EXAMPLES / "quickstart.yaml"), f"ray.address={address}",
                   f"storage.path={tmp_path}", "prompts.limit=4", "teachers.0.replicas=1",
                   "decoding.max_new_tokens=8", "ray.namespace=cli-test")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 answer(s) stored, 0 failed" in proc.stdout
    assert "generating 4 prompt(s)" in proc.stderr
    # stderr is a pipe here, as in a Ray Job's log: plain progress lines, no bar redraws
    assert "[backpack] answered 4/4 (0 failed)" in proc.stderr and "answer/s" not in proc.stderr
    assert DatasetStore(tmp_path / "quickstart" / "dataset", create=False).read().num_rows == 4


@pytest.mark.integration
def test_ctrl_c_stops_everything_and_the_rerun_resumes(ray_session, smol_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO
    from test_ray_generate import redis_processes_for

    address = ray_session.get_runtime_context().gcs_address
    args = [sys.executable, "-m", "backpack.cli", "generate", str(EXAMPLES / "quickstart.yaml"),
            f"ray.address={address}", f"storage.path={tmp_path}", "prompts.limit=40", "teachers.0.replicas=1",
            "teachers.0.batch_size=1", "decoding.max_new_tokens=16", "scheduler.flush_rows=1",
            "ray.namespace=cli-interrupt"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dataset = tmp_path / "quickstart" / "dataset"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # interrupt once some answers are stored
        if (dataset / "manifest.json").exists() and DatasetStore(dataset, create=False).version >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; rerun the same command to resume" in err and "Traceback" not in err
    assert not redis_processes_for(tmp_path)
    stored = DatasetStore(dataset, create=False).answered_ids()
    assert 2 <= len(stored) < 40
    # no actor of the interrupted run is left on the cluster (the CLI ran as its own Ray job)
    import ray._private.state as ray_state

    mine = ray_session.get_runtime_context().get_job_id()
    left = [a for a in ray_state.actors().values()
            if a["State"] == "ALIVE" and a["JobID"] != mine and a["ActorClassName"] in ("TeacherHost", "Scheduler")]
    assert not left, left


def test_unreachable_ray_address_fails_fast(tmp_path):
    proc = run_cli("generate", str(EXAMPLES / "quickstart.yaml"), "ray.address=127.0.0.1:1",
                   f"storage.path={tmp_path}", timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot reach the Ray cluster at '127.0.0.1:1'" in proc.stderr, proc.stderr[-2000:]


def test_flags_may_come_between_the_config_and_its_overrides():
    from backpack.cli import _flags_last, build_parser

    parse = lambda *a: build_parser().parse_args(_flags_last(list(a)))  # noqa: E731
    ev = parse("eval", "c.yaml", "--questions", "q.jsonl", "storage.path=/x", "--version=3", "-q", "name=y")
    assert (ev.config, ev.questions, ev.version, ev.quiet, ev.overrides) == ("c.yaml", "q.jsonl", 3, True,
                                                                             ["storage.path=/x", "name=y"])
    run = parse("run", "c.yaml", "--continual", "teachers.0.replicas=2")
    assert run.continual and run.overrides == ["teachers.0.replicas=2"]


def test_progress_off_a_terminal_is_a_line_every_few_seconds():
    import io

    from backpack.runtime.progress import TerminalReporter

    now = [0.0]
    out = io.StringIO()  # not a terminal
    rep = TerminalReporter(stream=out, clock=lambda: now[0])
    for done in range(1, 11):  # one answer a second, 10 of them
        rep.progress(done, 0, 10, tokens=20 * done, seconds=float(done))
        now[0] += 1.0
    rep.close()
    # the first answer, one line per LOG_EVERY (10 s) after it, and the last answer, whenever it comes
    assert out.getvalue().splitlines() == ["[backpack] answered 1/10 (0 failed), 20.0 tok/s",
                                           "[backpack] answered 10/10 (0 failed), 20.0 tok/s"]
    quiet = io.StringIO()
    TerminalReporter(quiet=True, stream=quiet).progress(1, 0, 10, 5, 1.0)
    assert quiet.getvalue() == ""


def test_mistakes_a_new_user_makes_get_one_clear_message(capsys, tmp_path):
    from conftest import run_main

    quick = str(EXAMPLES / "quickstart.yaml")
    # the student's base is looked for before any teacher works, beside the teachers' models
    proc = run_main(capsys, "run", quick, f"student.base={tmp_path}/nope/dir")
    assert_clear_error(proc, f"student.base: file or directory not found: '{tmp_path}/nope/dir'")
    # a storage path that cannot be created
    proc = run_main(capsys, "generate", quick, "storage.path=/proc/x")
    assert_clear_error(proc, "storage.path: cannot create the run's folder '/proc/x/quickstart'")
    # overrides are optional: only the config is missing
    with pytest.raises(SystemExit) as exit_:
        run_main(capsys, "run")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "required: config" in err and "overrides" not in err.splitlines()[-1]


def test_validate_never_echoes_a_secret(capsys):
    from conftest import run_main

    proc = run_main(capsys, "validate", str(EXAMPLES / "quickstart.yaml"), "redis.url=redis://:hunter2@host:7/0",
                    "storage.path=s3://b/runs?region=eu")
    assert proc.returncode == 0 and "hunter" not in proc.stdout + proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["redis"]["url"] == "redis://:***@host:7/0" and shown["storage"]["path"].endswith("region=eu")
    # storage credentials belong in the environment: in the URI they would land in every version.json
    keys = run_main(capsys, "validate", str(EXAMPLES / "quickstart.yaml"),
                    "storage.path=s3://b/runs?secret_key=hunter3&region=eu")
    assert_clear_error(keys, "storage.path: holds credentials", "AWS_SECRET_ACCESS_KEY")
    assert "hunter3" not in keys.stderr
    bad = run_main(capsys, "validate", str(EXAMPLES / "quickstart.yaml"), "teachers.0.backend=openai",
                   "teachers.0.endpoint.base_url=https://me:sk-123@api.example.com/v1")
    assert_clear_error(bad, "holds credentials", "endpoint.api_key_env")
    assert "sk-123" not in bad.stderr


def test_training_reports_its_steps_while_ray_train_runs(tmp_path):
    from backpack.data.storage import RunFiles
    from backpack.run.train import TrainingProgress

    files = RunFiles(tmp_path)
    files.write_text("train/metrics.jsonl", json.dumps({"step": 10, "loss": 9.0}) + "\n")  # an earlier run's
    said = []
    rep = type("Rep", (), {"stage": lambda self, text: said.append(text)})()
    progress = TrainingProgress(files, "train/metrics.jsonl", 40, rep, every=0.05)
    progress.report()
    assert said == []  # step 10 was reported by the run that logged it
    files.append_text("train/metrics.jsonl", json.dumps({"step": 15, "loss": 2.5, "tokens_per_s": 812.4}) + "\n")
    files.append_text("train/metrics.jsonl", '{"step": 20, "lo')  # a line being written: read next time
    progress.report()
    assert said == []
    files.write_text("train/metrics.jsonl", json.dumps({"step": 20, "loss": 2.25, "tokens_per_s": 800}) + "\n")
    with progress:
        import time

        time.sleep(0.3)
    assert said == ["training: step 20/40, loss 2.250, 800 tok/s"]


def test_configs_too_deep_or_with_impossible_paths_are_one_message(capsys, tmp_path):
    from conftest import run_main

    deep = tmp_path / "deep.yaml"
    deep.write_text("name: " + "[" * 50_000 + "]" * 50_000 + "\n")
    assert_clear_error(run_main(capsys, "validate", str(deep)), "nested too deeply")
    proc = run_main(capsys, "validate", str(EXAMPLES / "quickstart.yaml"), "prompts.path=" + "x" * 100_000)
    assert_clear_error(proc, "prompts.path: file not found", "(100000 characters)")
    assert len(proc.stderr) < 2000
