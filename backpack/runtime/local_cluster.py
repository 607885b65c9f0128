"""A local multi-node Ray cluster on one machine: a head and worker nodes, each its own `ray start --block`.

Scale-out behaviour (teachers pinned to nodes by custom resources, a node that dies mid-run, `ray job submit`)
needs more than the single node `ray.init()` starts, and a laptop is one machine. Here every node is its own
`ray start ... --block` process in its own session (process group), with its own logical CPUs and custom
resources, all joined to one head:

    with LocalCluster([{"teacher": 1}, {"teacher": 1, "trainer": 1}]) as cluster:
        subprocess.run([...], env={**cluster.env, "RAY_ADDRESS": cluster.address})

Other Ray clusters may run on the same machine (a test session's `ray.init()`), so every port a node opens is
a free one chosen here (Ray's defaults 6379, 8265, 10001, 52365... are never touched), and worker processes bind
OS-assigned ports. Each node has its own temp dir, /tmp/bpc-XXXXXXXX/<node>: short, as Ray's Unix socket paths
must stay under 107 bytes; and its own, because a worker node started without --temp-dir shares the head's
session dir, where nodes starting at the same time pick the same socket names ("raylet.1": bind: Address
already in use, the raylet aborts). Ray resolves 127.0.0.1 to the machine's address for node IPs and the GCS
address; clients on this machine connect to `address` all the same.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from backpack.core.resources import check_custom_resources
from backpack.errors import BackpackError

HOST = "127.0.0.1"
LABEL = "backpack-node"  # a node label with our name of each node ("head", "worker-0", ...)
MARK = "BACKPACK_LOCAL_CLUSTER"  # in every node's environment (so its processes'): the cluster's temp dir
_NODE_PORTS = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
               "dashboard-agent-grpc-port", "runtime-env-agent-port")
_HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port")


class ClusterError(BackpackError):
    """The local cluster could not start: names the node that did not come up and shows its log's tail."""


@dataclass
class Node:
    """One `ray start --block` process of the cluster (the leader of its own process group)."""

    name: str                       # "head", "worker-0", ...
    cpus: int
    resources: dict[str, float]
    ports: dict[str, int]
    log: str                        # the `ray start` process's stdout and stderr
    pid: int = 0
    start_time: int = 0             # of the pid: a recorded pid is this node only while its start time matches
    proc: Optional[subprocess.Popen] = field(default=None, repr=False)


def find_ray() -> str:
    """The `ray` command beside this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if not found:
        raise ClusterError(f"no `ray` command beside {sys.executable} or on PATH: pip install 'ray[default]'")
    return found


OWN_MARK = ".backpack-local-cluster"  # in every temp folder a LocalCluster made


def is_own_temp_dir(path: str) -> bool:
    """A folder this tool made for a cluster (a state file from elsewhere may name any folder): a /tmp/bpc-*
    folder, not a link, owned by this user, holding the mark."""
    p = Path(path)
    try:
        info = p.lstat()
    except OSError:
        return False
    return (p.parent == Path("/tmp") and p.name.startswith("bpc-") and stat.S_ISDIR(info.st_mode)
            and info.st_uid == os.getuid() and (p / OWN_MARK).is_file())


class LocalCluster:
    """A head plus one worker node per entry of `workers` (that node's custom resources), on this machine.

    Each worker node has `cpus_per_node` logical CPUs, the head `head_cpus` (default: the same); logical, so
    several nodes on a 2-core machine oversubscribe it. `env` is added to every node's environment and to
    `self.env`, the environment a client (ray.init, `ray job submit`) needs: Ray's token auth, with a token
    made at start (RAY_AUTH_TOKEN_PATH); `env={"RAY_AUTH_MODE": "disabled"}` turns it off. With `detached=True`
    the nodes outlive this process (the CLI's `up`); otherwise they get SIGTERM when the thread that started
    them dies.
    """

    def __init__(self, workers: list[dict[str, float]], head_resources: dict[str, float] | None = None,
                 cpus_per_node: float = 2, head_cpus: float | None = None, env: dict[str, str] | None = None,
                 object_store_mb: int = 256, detached: bool = False):
        self.ray = find_ray()
        cpus = _whole(cpus_per_node, "cpus_per_node")
        self.specs = [("head", _whole(cpus if head_cpus is None else head_cpus, "head_cpus"),
                       dict(head_resources or {}))]
        self.specs += [(f"worker-{i}", cpus, dict(r)) for i, r in enumerate(workers)]
        for name, _, res in self.specs:
            try:
                check_custom_resources(res)
            except ValueError as e:  # CPUs come from cpus_per_node / head_cpus
                raise ValueError(f"node {name}: {e}") from None
        self.object_store_mb, self.detached = object_store_mb, detached
        base = _base_env()
        # Ray's token auth: every node and client presents the token in <temp dir>/auth-token (0600, in a 0700
        # folder), written at start; a process of another user on this machine cannot submit jobs
        self.added_env = {"PATH": f"{Path(sys.executable).parent}:{base.get('PATH', '')}", "RAY_AUTH_MODE": "token",
                          # Ray drains a node on SIGTERM for up to 30 s (for Ray Serve); a dev cluster stops at once
                          "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **(env or {})}
        self.env: dict[str, str] = {**base, **self.added_env}
        self.temp_dir = ""
        self.all_nodes: list[Node] = []
        self.address = self.dashboard_url = ""

    @property
    def workers(self) -> list[Node]:
        return self.all_nodes[1:]

    # ------------------------------------------------------------------ start

    def start(self, timeout: float = 180) -> "LocalCluster":
        """Start the head, then every worker; return once every node is ALIVE and its dashboard agent listens
        (so `ray job submit` and `ray.init(address=...)` work at once). On failure, stop what was started."""
        if self.all_nodes:
            raise RuntimeError("this LocalCluster is already started")
        self.temp_dir = tempfile.mkdtemp(prefix="bpc-", dir="/tmp")  # short: Unix socket paths <= 107 bytes
        Path(self.temp_dir, OWN_MARK).write_text(str(os.getpid()))  # `stop` removes only folders that have it
        for name, _, _ in self.specs:
            os.mkdir(os.path.join(self.temp_dir, name))
        if self.added_env.get("RAY_AUTH_MODE") == "token" and "RAY_AUTH_TOKEN" not in self.added_env:
            token_path = os.path.join(self.temp_dir, "auth-token")
            fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            self.added_env["RAY_AUTH_TOKEN_PATH"] = token_path
            self.env["RAY_AUTH_TOKEN_PATH"] = token_path
        taken: set[int] = set()
        try:
            for name, cpus, res in self.specs:
                wanted = _NODE_PORTS + (_HEAD_PORTS if name == "head" else ())
                ports = {p: _free_port(taken) for p in wanted}
                self.all_nodes.append(Node(name, cpus, res, ports, os.path.join(self.temp_dir, f"{name}.log")))
            head = self.all_nodes[0]
            self.address = f"{HOST}:{head.ports['port']}"
            self.dashboard_url = f"http://{HOST}:{head.ports['dashboard-port']}"
            deadline = time.monotonic() + timeout
            self._launch(head)
            self._wait([head], deadline, timeout)
            for node in self.workers:  # together: each worker node loads Ray on its own, in parallel
                self._launch(node)
            self._wait(self.workers, deadline, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _command(self, node: Node) -> list[str]:
        cmd = [self.ray, "start", "--block", "--disable-usage-stats", f"--temp-dir={self.temp_dir}/{node.name}",
               f"--num-cpus={node.cpus}", "--num-gpus=0", f"--resources={json.dumps(node.resources)}",
               f"--labels={LABEL}={node.name}", f"--object-store-memory={self.object_store_mb * 2**20}",
               # OS-assigned worker ports: the default range 10002-19999 would be shared by every node here
               "--min-worker-port=0", "--max-worker-port=0", *(f"--{p}={node.ports[p]}" for p in _NODE_PORTS)]
        if node.name == "head":
            return cmd + ["--head", f"--port={node.ports['port']}", "--include-dashboard=true",
                          f"--dashboard-host={HOST}", f"--dashboard-port={node.ports['dashboard-port']}",
                          f"--ray-client-server-port={node.ports['ray-client-server-port']}"]
        return cmd + [f"--address={self.address}"]

    def _launch(self, node: Node) -> None:
        with open(node.log, "ab") as log:
            env = {**self.env, MARK: self.temp_dir}  # not in self.env: a client is not part of the cluster
            node.proc = subprocess.Popen(self._command(node), env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.temp_dir, start_new_session=True,
                                         preexec_fn=None if self.detached else _die_with_parent)
        node.pid, node.start_time = node.proc.pid, _start_time(node.proc.pid) or 0

    def _wait(self, waiting: list[Node], deadline: float, timeout: float) -> None:
        """Until each of `waiting` is ALIVE in the GCS and its dashboard agent listens."""
        while True:
            for node in waiting:
                if not _alive(node.pid, node.start_time):
                    raise ClusterError(f"Ray node {node.name!r} exited while starting\n{self.log_tail(node)}")
            alive = set()
            if _port_open(self.all_nodes[0].ports["dashboard-port"]):
                try:
                    alive = {n["name"] for n in self.nodes()}
                except (OSError, ValueError, KeyError):  # the dashboard is still starting its modules
                    pass
            waiting = [n for n in waiting
                       if n.name not in alive or not _port_open(n.ports["dashboard-agent-listen-port"])]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"Ray node(s) {', '.join(repr(n.name) for n in waiting)} did not come up within "
                                   f"{timeout:.0f} s\n" + "\n".join(self.log_tail(n) for n in waiting))
            time.sleep(0.5)

    def log_tail(self, node: Node, chars: int = 1500) -> str:
        """The end of a node's `ray start` output, and of its raylet's and GCS's error logs where Ray puts a
        crash (e.g. a port taken meanwhile). Quoted in errors: the files go with the temp dir."""
        logs = Path(self.temp_dir, node.name, "session_latest", "logs")
        out = []
        for path in [Path(node.log), *sorted(logs.glob("raylet*.err")), *sorted(logs.glob("gcs_server*.err"))]:
            text = path.read_text(errors="replace")[-chars:].strip() if path.is_file() else ""
            if text:
                out.append(f"--- node {node.name!r}: end of {path.name} ---\n{text}")
        return "\n".join(out) or f"(node {node.name!r} wrote no log)"

    # ------------------------------------------------------------------ state

    def auth_headers(self) -> dict[str, str]:
        """What an HTTP client of the dashboard sends: the bearer token under token auth."""
        token = self.added_env.get("RAY_AUTH_TOKEN")
        path = self.added_env.get("RAY_AUTH_TOKEN_PATH")
        if token is None and path:
            token = Path(path).read_text().strip()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def nodes(self, include_dead: bool = False) -> list[dict]:
        """The cluster's live nodes (and dead ones with `include_dead`): name (our label: "head", "worker-0"...),
        node_id, alive, is_head, resources. From the dashboard's state API, so this process needs no ray.init;
        OSError if the head does not answer."""
        request = urllib.request.Request(f"{self.dashboard_url}/api/v0/nodes?limit=1000&detail=1",
                                         headers=self.auth_headers())
        with urllib.request.urlopen(request, timeout=10) as r:
            rows = json.load(r)["data"]["result"]["result"]
        out = [{"name": (n.get("labels") or {}).get(LABEL, ""), "node_id": n["node_id"],
                "alive": n["state"] == "ALIVE", "is_head": bool(n.get("is_head_node")),
                "resources": n.get("resources_total") or {}} for n in rows]
        return sorted((n for n in out if include_dead or n["alive"]), key=lambda n: (not n["is_head"], n["name"]))

    def state(self) -> dict:
        """What `from_state` needs to find (and stop) this cluster from another process: JSON-able."""
        return {"address": self.address, "dashboard_url": self.dashboard_url, "temp_dir": self.temp_dir,
                "env": self.added_env,
                "nodes": [{k: v for k, v in n.__dict__.items() if k != "proc"} for n in self.all_nodes]}

    @classmethod
    def from_state(cls, state: dict) -> "LocalCluster":
        """A handle on a cluster started (detached) by another process, from its `state()`."""
        self = cls.__new__(cls)
        self.ray, self.specs, self.detached, self.object_store_mb = find_ray(), [], True, 0
        self.added_env = state["env"]
        self.env = {**_base_env(), **self.added_env}
        self.address, self.dashboard_url, self.temp_dir = state["address"], state["dashboard_url"], state["temp_dir"]
        self.all_nodes = [Node(**n) for n in state["nodes"]]
        return self

    # ------------------------------------------------------------------ stop

    def kill_worker(self, index: int) -> None:
        """SIGKILL worker node `index` (0-based, as in `workers`: node "worker-<index>") with all its processes
        at once: a node failure. The GCS marks it dead after its health checks fail (about 10-30 s)."""
        node = self.workers[index]
        procs = _processes([node])
        _signal(procs, signal.SIGKILL)
        _wait_gone(procs, 10.0)
        if node.proc is not None:
            node.proc.wait()

    def stop(self, grace: float = 30.0) -> list[int]:
        """Stop every node: SIGTERM all processes of each node (its process group and its descendants; the
        workers, then the head), wait up to `grace` s, SIGKILL what is left (found by process group, parentage
        and the cluster's mark in the environment), reap, remove the temp dir. Idempotent. Returns the pids
        still alive at the end: none, unless a process resists SIGKILL."""
        if self.all_nodes and not _alive(self.all_nodes[0].pid, self.all_nodes[0].start_time):
            grace = min(grace, 3.0)  # the head is gone: nodes and agents would wait ~30 s for a GCS to say goodbye
        for wave in (self.workers, self.all_nodes[:1]):  # the head's GCS stays up while the workers leave
            procs = _processes(wave)
            _signal(procs, signal.SIGTERM)  # as `ray stop` does: every process of the node at once
            _wait_gone(procs, grace)
        left = _processes(self.all_nodes, mark=self.temp_dir)
        _signal(left, signal.SIGKILL)
        left = _wait_gone(left, 10.0)
        for node in self.all_nodes:
            if node.proc is not None:
                node.proc.wait()  # reap: no zombie stays behind
        self.all_nodes = []
        if self.temp_dir and is_own_temp_dir(self.temp_dir):
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.temp_dir = ""
        return sorted(left)

    def __enter__(self) -> "LocalCluster":
        return self if self.all_nodes else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------- processes and ports

def _base_env() -> dict[str, str]:
    """This process's environment without RAY_ADDRESS: another cluster's address (inherited inside a Ray job)
    must not steer these nodes or their clients."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}


def _whole(value: float, what: str) -> int:
    if value < 0 or value != int(value):
        raise ValueError(f"{what} must be a whole number >= 0 (`ray start --num-cpus` takes an integer), "
                         f"got {value!r}")
    return int(value)


def _free_port(taken: set[int]) -> int:
    """A port free on every interface (some Ray servers bind 0.0.0.0), and not already given to another node."""
    while True:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def _port_open(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _die_with_parent():  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _stat(pid: int) -> Optional[list[str]]:
    """Fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...), None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> Optional[int]:
    st = _stat(pid)
    return int(st[19]) if st else None


def _marked(pid: int, tag: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return tag in b"\0" + f.read()
    except OSError:  # gone, or not ours to read
        return False


def _processes(nodes: list[Node], mark: str = "") -> dict[int, int]:
    """pid -> start time of the live processes of `nodes`: each `ray start` leader, its process group, the
    descendants of both (Ray's worker processes start sessions of their own), and with `mark` every process
    whose environment carries this cluster's mark (one that left both, its raylet gone)."""
    table = {}  # pid -> (ppid, pgrp, start time)
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) and st[0] != "Z":
            table[int(entry)] = (int(st[1]), int(st[2]), int(st[19]))
    found = set()
    for n in nodes:
        if n.pid <= 0 or (n.pid in table and table[n.pid][2] != n.start_time):
            continue  # never launched; or a reused pid (Linux reuses none while its process group lives)
        found |= {p for p, (_, pgrp, _) in table.items() if p == n.pid or pgrp == n.pid}
    if mark:
        tag = f"\0{MARK}={mark}\0".encode()
        found |= {p for p in table if _marked(p, tag)}
    children: dict[int, list[int]] = {}
    for p, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(p)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return {p: table[p][2] for p in found}


def _alive(pid: int, start_time: int) -> bool:
    """`pid` is still the process that started at `start_time`, and not a zombie."""
    st = _stat(pid)
    return st is not None and st[0] != "Z" and int(st[19]) == start_time


def _signal(procs: dict[int, int], sig: int) -> None:
    for pid, start_time in procs.items():
        if _start_time(pid) == start_time:  # still that process
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _wait_gone(procs: dict[int, int], timeout: float) -> dict[int, int]:
    """Wait up to `timeout` s for `procs` (pid -> start time) to exit; those still alive (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        left = {p: t for p, t in procs.items() if _alive(p, t)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)
