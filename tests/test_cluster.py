"""A local multi-node Ray cluster started by the test (a head, a `teacher` node and a `teacher` + `trainer`
node, each its own `ray start`), a standalone Redis server, and Backpack run against them the way a cluster user
runs it: the embedded Redis refused, a Ray Job that distils end to end with every actor on the node its role
asks for and every file in an object store, and a node hosting a teacher replica killed mid-run without losing a
prompt."""

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import redis
import yaml

from backpack.data.storage import RunFiles, join_uri
from backpack.runtime.local_cluster import LocalCluster
from backpack.runtime.redis_server import EmbeddedRedis

from conftest import EXAMPLES, REPO

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster([{"teacher": 1}, {"teacher": 1, "trainer": 1}], cpus_per_node=2) as c:
        yield c


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A Redis server of its own (not a run's embedded one): what every node of a cluster reaches."""
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


def run_config(tmp_path, name: str, redis_url: str, model: str, **over) -> str:
    """The quickstart config made tiny and placed by role: teachers on `teacher` nodes, one replica per node,
    training workers on the `trainer` node, shared storage (every node is on this machine), external Redis."""
    cfg = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    cfg.update(name=name, storage={"path": str(tmp_path / "runs"), "shared": True}, redis={"url": redis_url})
    cfg["teachers"][0].update(model=model, replicas=2, threads=1, batch_size=1, max_in_flight=1,
                              resources={"teacher": 1}, placement="strict_spread")
    cfg["prompts"].update(limit=10)
    cfg["decoding"].update(max_new_tokens=8)
    cfg["scheduler"].update(flush_rows=2)
    cfg["student"] = {"base": over.pop("student", model), "mode": "full"}
    cfg["training"].update(max_steps=2, checkpoint_every=2, batch_size=4, threads_per_worker=1,
                           cpus_per_worker=0.5, resources_per_worker={"trainer": 1})
    cfg["eval"].update(max_rows=3, max_new_tokens=8, heldout_fraction=0.3)
    for key, value in over.items():
        section, field = key.split("__")
        cfg[section][field] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def backpack(cluster, *args) -> subprocess.Popen:
    """`backpack ARGS` started as a driver joining the cluster (RAY_ADDRESS, as inside a Ray Job)."""
    env = {**cluster.env, "RAY_ADDRESS": cluster.address, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "backpack.cli", *args], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def actors(cluster) -> list[dict]:
    """Every actor the cluster has seen (dead ones too): class, state, node id."""
    return dashboard(cluster, "/api/v0/actors?limit=10000&detail=1")["data"]["result"]["result"]


def dashboard(cluster, path: str):
    """A GET of the cluster's dashboard API, with its token (the local cluster runs Ray's token auth)."""
    request = urllib.request.Request(f"{cluster.dashboard_url}{path}", headers=cluster.auth_headers())
    return json.load(urllib.request.urlopen(request, timeout=10))


def test_embedded_redis_and_local_storage_are_refused(cluster, tmp_path, tiny_model_dir):
    config = run_config(tmp_path, "refused", None, tiny_model_dir)
    proc = backpack(cluster, "generate", config, "redis.url=null", "storage.shared=false")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    assert "redis.url: not set" in out and "3 nodes" in out and "storage.shared: true" in out
    assert "Traceback" not in out


def test_ray_job_distils_with_every_actor_on_its_role_node(cluster, redis_url, tmp_path, tiny_model_dir, s3):
    # the run's files in an object store (an S3 API every node reaches), not in a shared folder
    config = run_config(tmp_path, "job", redis_url, tiny_model_dir)
    data = yaml.safe_load(open(config))
    data["storage"] = {"path": s3, "local_path": str(tmp_path / "work")}
    open(config, "w").write(yaml.safe_dump(data))
    job_id = f"backpack-cluster-{time.monotonic_ns()}"
    submit = subprocess.run([str(cluster.ray), "job", "submit", "--address", cluster.dashboard_url,
                             "--working-dir", str(REPO), "--no-wait", "--submission-id", job_id,
                             "--runtime-env-json", json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1"}}),
                             "--", "python", "-m", "jobs.distill", "--config", config],
                            env=cluster.env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert submit.returncode == 0, submit.stderr[-2000:]
    deadline, status = time.monotonic() + 480, ""
    while time.monotonic() < deadline:
        status = dashboard(cluster, f"/api/jobs/{job_id}")["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3)
    # the Ray Jobs CLI gives the run's log back
    logs = subprocess.run([str(cluster.ray), "job", "logs", "--address", cluster.dashboard_url, job_id],
                          env=cluster.env, capture_output=True, text=True, timeout=60).stdout
    assert status == "SUCCEEDED", logs[-3000:]
    assert "NLL/token" in logs and "report:" in logs
    assert "# Backpack report: job" in logs and "## Samples" in logs  # the report itself, from the job's log
    files = RunFiles(join_uri(s3, "job"))
    report = json.loads(files.read_text("report/report.json"))
    assert [v["version"] for v in report["versions"]] == [0, 1]
    assert files.exists("students/v1/trainable.safetensors") and files.glob("train", "/state.json")
    assert not (tmp_path / "runs").exists()  # nothing went to a node-local folder

    nodes = {n["node_id"]: n for n in cluster.nodes()}
    teacher_nodes = {i for i, n in nodes.items() if n["resources"].get("teacher")}
    trainer_nodes = {i for i, n in nodes.items() if n["resources"].get("trainer")}
    seen = actors(cluster)
    teachers = [a["node_id"] for a in seen if a["class_name"] == "TeacherHost"]
    workers = [a["node_id"] for a in seen if a["class_name"] == "RayTrainWorker"]
    # two replicas, strict_spread: one on each teacher node, none on the head
    assert len(teachers) == 2 and set(teachers) == teacher_nodes
    assert workers and set(workers) <= trainer_nodes
    # the scheduler stays with the driver (on the head in a Ray Job): no teacher node's death can take it along
    head = next(i for i, n in nodes.items() if n["is_head"])
    assert {a["node_id"] for a in seen if a["class_name"] == "Scheduler"} == {head}


def test_killed_teacher_node_loses_no_prompt(cluster, redis_url, tmp_path, smol_dir):
    # the real model (about a second per answer here), so the run is still going when the node dies
    config = run_config(tmp_path, "kill", redis_url, smol_dir, prompts__limit=16, decoding__max_new_tokens=16)
    before = {a["actor_id"] for a in actors(cluster) if a["class_name"] == "TeacherHost"}
    proc = backpack(cluster, "generate", config)
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 300
    while int(client.hget("backpack:kill:progress", "done") or 0) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    node0 = next(n["node_id"] for n in cluster.nodes() if n["name"] == "worker-0")
    ours = [a for a in actors(cluster) if a["class_name"] == "TeacherHost" and a["actor_id"] not in before]
    assert node0 in {a["node_id"] for a in ours}  # strict_spread put a replica on the node about to die
    cluster.kill_worker(0)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    progress = {k.decode(): v.decode() for k, v in client.hgetall("backpack:kill:progress").items()}
    assert int(progress["done"]) == 16 and int(progress["failed"]) == 0, progress
    from backpack.data.store import DatasetStore

    data = DatasetStore(str(tmp_path / "runs" / "kill" / "dataset"), create=False).read()
    assert data.num_rows == 16 and set(data.column("status").to_pylist()) == {"ok"}
    assert len(set(data.column("query_id").to_pylist())) == 16
    assert "replicas lost during the run (their work was re-routed): smollm2/" in out


def test_local_cluster_script_up_status_down(tmp_path):
    state = tmp_path / "cluster.json"
    script = [sys.executable, str(REPO / "cluster" / "local_cluster.py")]
    up = subprocess.run([*script, "up", "--worker", "teacher=1", "--cpus", "1", "--state", str(state)],
                        capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        recorded = json.loads(state.read_text())
        url = redis.connection.parse_url(recorded["redis"]["url"])
        # the submit line names the password's variable, never the password (the nodes have it set)
        assert "storage.shared=true" in up.stdout and url["password"] not in up.stdout
        assert (f"redis.url=redis://127.0.0.1:{url['port']}/0 redis.password_env=BACKPACK_REDIS_PASSWORD"
                in up.stdout)
        assert redis.Redis.from_url(recorded["redis"]["url"]).ping()
        # Ray's token auth: the submit line names the token's file, and the dashboard refuses a request without it
        assert "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=" in up.stdout
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{recorded['dashboard_url']}/api/v0/nodes", timeout=10)
        assert refused.value.code in (401, 403)
        shown = subprocess.run([*script, "password", "--state", str(state)], capture_output=True, text=True,
                               timeout=60)
        assert shown.stdout.strip() == url["password"]
        status = subprocess.run([*script, "status", "--state", str(state)], capture_output=True, text=True,
                                timeout=60)
        assert status.returncode == 0 and "worker-0" in status.stdout and "'teacher': 1.0" in status.stdout
    finally:
        down = subprocess.run([*script, "down", "--state", str(state)], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0 and "nothing of it is left" in down.stdout, down.stdout + down.stderr
    assert not state.exists()
    time.sleep(1)
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(recorded["redis"]["url"], socket_connect_timeout=2).ping()
