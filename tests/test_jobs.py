"""`ray job submit` of jobs/distill.py to a `ray start --head` cluster started by the test: a tiny
distillation runs to completion and its logs and report are retrievable."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import EXAMPLES, REPO

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head(tmp_path):
    """A Ray head started with `ray start --head --block`, stopped (with its processes) at the end."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    gcs, dash = free_port(), free_port()
    # The test session's own Ray cluster holds Ray's default agent ports: a second head on the default ports
    # has no job agent ("No available agent to submit job"), so every port this head opens is a free one.
    ports = [f"--{flag}={free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                    "metrics-export-port", "runtime-env-agent-port",
                                                    "node-manager-port", "object-manager-port",
                                                    "ray-client-server-port")]
    # Ray puts Unix sockets under its temp dir: pytest's tmp_path is too long for a socket path (107 bytes)
    temp = tempfile.mkdtemp(prefix="bpr-", dir="/tmp")
    proc = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}",
                             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=3", "--block",
                             "--disable-usage-stats", f"--temp-dir={temp}", *ports],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("the Ray head's dashboard did not come up")
    yield url, env
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_distill(head, tmp_path, smol_dir, tiny_model_dir):
    url, env = head
    cfg = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    cfg.update(name="job", storage={"path": str(tmp_path / "runs")})
    cfg["teachers"][0].update(replicas=1, threads=1)
    cfg["prompts"].update(limit=10)
    cfg["decoding"].update(max_new_tokens=8)
    cfg["student"] = {"base": tiny_model_dir, "mode": "full"}
    cfg["training"].update(max_steps=2, checkpoint_every=2, batch_size=4, threads_per_worker=1)
    cfg["eval"].update(max_rows=3, max_new_tokens=8, heldout_fraction=0.3)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ray = str(Path(sys.executable).parent / "ray")
    job_id = f"backpack-test-{os.getpid()}"
    # the dashboard answers before the node's job agent is up: submission says "No available agent" until then
    deadline = time.monotonic() + 120
    while True:
        submit = subprocess.run([ray, "job", "submit", "--address", url, "--working-dir", str(REPO), "--no-wait",
                                 "--submission-id", job_id, "--", "python", "-m", "jobs.distill", "--config",
                                 str(config)], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
        if "No available agent" not in submit.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stderr[-2000:]
    # The job's status and logs come from the dashboard's REST API: `ray job status` logs to stderr, in prose.
    deadline = time.monotonic() + 480
    status = ""
    while time.monotonic() < deadline:
        status = json.load(urllib.request.urlopen(f"{url}/api/jobs/{job_id}", timeout=10))["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3)
    logs = json.load(urllib.request.urlopen(f"{url}/api/jobs/{job_id}/logs", timeout=10))["logs"]
    assert status == "SUCCEEDED", logs[-3000:]
    assert "NLL/token" in logs and "report:" in logs
    report = json.loads((tmp_path / "runs" / "job" / "report" / "report.json").read_text())
    assert [v["version"] for v in report["versions"]] == [0, 1]
