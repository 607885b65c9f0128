"""Embedded Redis lifecycle and clear errors for unreachable or refused servers (real redis-server)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from backpack.errors import RedisUnavailableError
from backpack.runtime.redis_server import EmbeddedRedis, RunKeys, connect, redact, with_password


def test_embedded_starts_with_password_and_stops_cleanly(tmp_path):
    server = EmbeddedRedis(tmp_path / "r").start()
    pid = server.proc.pid
    assert server.port != 6379
    client = connect(server.url)
    client.set("k", "v")
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=server.port).get("k")  # no password, no access
    server.stop()
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_aof_keeps_data_across_restart(tmp_path):
    with EmbeddedRedis(tmp_path / "r") as s1:
        connect(s1.url).set("kept", "yes")
    assert (tmp_path / "r" / "redis.conf").exists()
    with EmbeddedRedis(tmp_path / "r") as s2:
        assert connect(s2.url).get("kept") == "yes"


def test_embedded_dies_with_its_parent(tmp_path):
    code = ("import sys, time; from backpack.runtime.redis_server import EmbeddedRedis;"
            f"s = EmbeddedRedis({str(tmp_path / 'r')!r}).start(); print(s.proc.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    os.kill(pid, 0)
    parent.send_signal(signal.SIGKILL)  # no cleanup code runs in the parent
    parent.wait()
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("redis-server outlived its parent")


def test_unreachable_and_wrong_password(redis_server):
    with pytest.raises(RedisUnavailableError, match="cannot reach Redis at redis://127.0.0.1:1"):
        connect("redis://127.0.0.1:1/0", timeout=1)
    bad = f"redis://:wrong@127.0.0.1:{redis_server.port}/0"
    with pytest.raises(RedisUnavailableError, match="refused the password") as e:
        connect(bad)
    assert "wrong" not in str(e.value)  # the password is never echoed
    os.environ["BP_TEST_PW"] = redis_server.password
    try:
        assert connect(f"redis://127.0.0.1:{redis_server.port}/0", password_env="BP_TEST_PW").ping()
        # the URL every part of a run gets carries the password itself (actors have no such variable)
        url = with_password(f"redis://127.0.0.1:{redis_server.port}/0", "BP_TEST_PW")
        assert connect(url).ping() and redis_server.password not in redact(url)
    finally:
        del os.environ["BP_TEST_PW"]


def test_keys_are_namespaced_and_urls_redacted():
    assert RunKeys("r1").progress == "backpack:r1:progress" != RunKeys("r2").progress
    assert redact("redis://:secret@host:1/0") == "redis://:***@host:1/0"


def test_the_embedded_redis_files_are_private(tmp_path):
    old = os.umask(0o022)
    try:
        with EmbeddedRedis(tmp_path / "r") as s:
            connect(s.url).set("secret", "prompt text")
            time.sleep(1.2)  # appendfsync everysec
            files = [p for p in (tmp_path / "r").rglob("*") if p.is_file()]
            assert any("appendonly" in p.name for p in files)
            modes = {p.name: p.stat().st_mode & 0o777 for p in files}
    finally:
        os.umask(old)
    assert (tmp_path / "r").stat().st_mode & 0o777 == 0o700
    assert all(m & 0o077 == 0 for m in modes.values()), modes  # redis.conf (the password), AOF, log


def test_query_string_secrets_are_redacted_too():
    assert redact("s3://bucket/runs?endpoint_override=minio:9000&secret_key=abc&access_key=AK&scheme=http") == \
        "s3://bucket/runs?endpoint_override=minio:9000&secret_key=***&access_key=***&scheme=http"
    assert redact("https://user:pw@api.example.com/v1?token=t") == "https://user:***@api.example.com/v1?token=***"
    assert redact("runs/local/folder") == "runs/local/folder"


def test_a_redis_hiccup_is_retried_then_one_clear_error():
    from backpack.runtime.redis_server import with_retries

    slept, answers = [], iter([redis.exceptions.ConnectionError("down"), redis.exceptions.BusyLoadingError("aof"),
                               "1"])

    def call():
        got = next(answers)
        if isinstance(got, Exception):
            raise got
        return got
    assert with_retries(call, "reading the stop flag", "redis://:pw@h:1/0", sleep=slept.append) == "1"
    assert slept == [0.5, 1.0]

    def down():
        raise redis.exceptions.ConnectionError("Connection refused")
    slept.clear()
    with pytest.raises(RedisUnavailableError, match=r"redis://:\*\*\*@h:1/0 did not answer for 1\d s "
                                                     r"\(reading the stop flag\)"):
        with_retries(down, "reading the stop flag", "redis://:pw@h:1/0", budget_s=10, sleep=slept.append)
    assert slept == [0.5, 1.0, 2.0, 4.0, 8.0]
