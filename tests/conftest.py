"""Shared fixtures. Ray is started once per test session (ray.init costs 5-10 s) and only by tests that ask
for `ray_session`; the real default model is converted from its GGUF once and cached."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller polls its workers every 0.25 s instead of Backpack's 1 s: each state change of a fit
# waits for a poll, and the tests run a dozen fits of a few steps each (DEVELOPERS.md, "Ray Train's fixed cost").
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Credentials for the S3 server the storage tests start (moto accepts any): set before Ray starts, so its
# workers see them too, as they would see a cluster's own. No metadata-service lookups for credentials.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "backpack-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "backpack-test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="session")
def smol_dir() -> str:
    """The default SmolLM2-135M-Instruct model as a safetensors directory (converted once, then cached)."""
    from backpack.teachers.loader import resolve_model

    return resolve_model("default").path


@pytest.fixture(scope="session")
def tiny_model_dir(smol_dir, tmp_path_factory) -> str:
    """A tiny randomly initialised Llama with the SmolLM2 tokenizer, saved as a normal HF directory."""
    from backpack.teachers.loader import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, namespace="backpack-tests", log_to_driver=False,
                 logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture
def redis_server(tmp_path):
    from backpack.runtime.redis_server import EmbeddedRedis

    with EmbeddedRedis(tmp_path / "redis") as server:
        yield server


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, input: str | None = None):
    """Run `python -m backpack.cli ARGS` in a subprocess (`input`: its stdin); returns CompletedProcess (text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "backpack.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO, input=input)


def run_main(capsys, *args: str) -> subprocess.CompletedProcess:
    """`backpack ARGS` in-process (the CLI's `main`, as its console script calls it): the same exit status and
    output as run_cli, without a new interpreter importing torch and transformers again (5-8 s a call here)."""
    from backpack.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3():
    """A real S3 API (moto's server, a dev dependency) on 127.0.0.1 with an empty bucket; yields the bucket's URI
    with the options pyarrow needs in its query string. Credentials: the AWS_* variables set above."""
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("moto_server did not start")
                time.sleep(0.2)
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True)
        fs.create_dir("runs-bucket")
        yield f"s3://runs-bucket/runs?endpoint_override=127.0.0.1:{port}&scheme=http"
    finally:
        server.kill()
        server.wait()


@contextlib.contextmanager
def scripted_http(answer):
    """A real HTTP server on 127.0.0.1 whose POSTs `answer(body, headers)` answers with (status, payload, headers):
    an OpenAI-compatible endpoint scripted by a test. Yields its /v1 base URL."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, out, headers = answer(body, self.headers)
            data = out.encode() if isinstance(out, str) else json.dumps(out).encode()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()


def publish_stub_versions(registry, tmp_path, steps=(10, 20, 30)) -> list[int]:
    """Registry versions whose files are placeholders: for tests of numbering and the live version, which never
    load the weights."""
    from backpack.student import checkpoints

    ck = tmp_path / "stub-checkpoint"
    ck.mkdir(exist_ok=True)
    for name in (checkpoints.WEIGHTS, checkpoints.STATE):
        (ck / name).write_bytes(b"{}")
    return [registry.publish(ck, {"step": step}) for step in steps]
