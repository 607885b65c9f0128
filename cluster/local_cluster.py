"""A local multi-node Ray cluster on this machine, for trying scale-out (custom resources, node failure, Ray Jobs).

    .venv/bin/python cluster/local_cluster.py up [--worker teacher=1 --worker teacher=1,trainer=1] [--cpus 2]
    .venv/bin/python cluster/local_cluster.py status
    .venv/bin/python cluster/local_cluster.py down

`up` starts a head and one worker node per --worker (its custom resources; default: one teacher node and one
trainer node), each a `ray start --block` process on free ports (see backpack/runtime/local_cluster.py), and
returns while the nodes keep running; it records their pids and ports in a state file (--state, default
~/.local/state/backpack/local-cluster.json, mode 0600; one of anybody else's, or readable by others, is refused)
and prints the address, the dashboard URL and the `ray job submit`
command with the environment to use. `status` lists the live nodes; `down` stops exactly the recorded
processes (and what they started) and removes the state file.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import stat
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backpack.errors import BackpackError  # noqa: E402
from backpack.runtime.local_cluster import LocalCluster  # noqa: E402
from backpack.runtime.local_files import private_dirs, write_durably  # noqa: E402
from backpack.runtime.redis_server import EmbeddedRedis  # noqa: E402

# In a folder of this user's only (not /tmp, where anyone may leave a file under the name we would read).
DEFAULT_STATE = str(Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "backpack"
                    / "local-cluster.json")
PASSWORD_ENV = "BACKPACK_REDIS_PASSWORD"
# the quickstart's two teacher replicas fit the teacher node; Ray Train's worker the trainer node
DEFAULT_WORKERS = [{"teacher": 2.0}, {"trainer": 1.0}]


def parse_resources(text: str) -> dict[str, float]:
    """"teacher=1,trainer=0.5" -> {"teacher": 1.0, "trainer": 0.5}; a bare name counts 1; "" is no resources."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value) if sep else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad resource {item!r}: expected name=number") from None
    return out


def _is_redis(pid: int) -> bool:
    """Still our redis-server (not a later process that got its pid)."""
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def read_state(path: str) -> dict | None:
    """The recorded cluster, if any. What it names is signalled and deleted, so only a file of this user's
    that nobody else can write (or read: it holds the Redis password) is believed."""
    p = Path(path)
    try:
        info = p.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise SystemExit(f"error: refusing the state file {path}: it must be a regular file of yours with mode "
                         f"0600 (it is {'a link or special file' if not stat.S_ISREG(info.st_mode) else ''}"
                         f"{'' if info.st_uid == os.getuid() else f'owned by uid {info.st_uid}'}"
                         f"{f' mode {info.st_mode & 0o777:o}' if info.st_mode & 0o077 else ''}); remove it")
    try:
        return json.loads(p.read_text())
    except ValueError:
        raise SystemExit(f"error: the state file {path} is not JSON; remove it") from None


def is_up(cluster: LocalCluster) -> bool:
    try:
        return bool(cluster.nodes())
    except OSError:
        return False


def print_nodes(cluster: LocalCluster) -> None:
    print(f"  {'node':10} {'node id':16} {'CPU':>4}  custom resources")
    for n in cluster.nodes():
        custom = {k: v for k, v in n["resources"].items()
                  if k not in ("CPU", "memory", "object_store_memory") and not k.startswith("node:")}
        print(f"  {n['name'] or '?':10} {n['node_id'][:12] + '...':16} {n['resources'].get('CPU', 0):4.0f}  "
              f"{custom or '-'}")


def up(args) -> int:
    old = read_state(args.state)
    if old is not None:
        cluster = LocalCluster.from_state(old)
        if is_up(cluster):
            print(f"a local cluster is already up ({old['address']}, state file {args.state}): run `down` first, "
                  "or give another --state", file=sys.stderr)
            return 1
        cluster.stop()  # a stale record (a crashed machine, killed nodes): clear what may be left of it
    workers = args.worker if args.worker is not None else DEFAULT_WORKERS
    # The Redis password reaches jobs through the nodes' environment (a job's driver inherits it), so no
    # command line, job record or log ever holds it: runs name it with redis.password_env.
    password = secrets.token_urlsafe(24)
    cluster = LocalCluster(workers, head_resources=args.head_resources, cpus_per_node=args.cpus,
                           head_cpus=args.head_cpus, detached=True, env={PASSWORD_ENV: password})
    print(f"starting a head and {len(workers)} worker node(s) and a Redis server...", flush=True)
    cluster.start(timeout=args.timeout)
    try:
        # a run on several nodes refuses the embedded per-run Redis: this one is the cluster's (redis.url)
        server = EmbeddedRedis(Path(cluster.temp_dir) / "redis", detached=True, password=password).start()
        state = {**cluster.state(), "redis": {"url": server.url, "pid": server.proc.pid}}
        private_dirs(Path(args.state).parent)
        write_durably(args.state, json.dumps(state, indent=1).encode(), mode=0o600)  # the Redis URL: a password
    except BaseException:
        cluster.stop()
        raise
    # what a client needs besides `ray` itself: the auth mode every node runs with, and where its token is
    env_text = " ".join(f"{k}={shlex.quote(cluster.added_env[k])}" for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")
                        if k in cluster.added_env)
    ray = shlex.quote(cluster.ray)
    print(f"Ray cluster up ({len(workers) + 1} nodes, state in {args.state}):")
    print_nodes(cluster)
    print(f"\n  address:   {cluster.address}    (ray.init(address=...), RAY_ADDRESS, or a run's ray.address=)")
    print(f"  dashboard: {cluster.dashboard_url}")
    print(f"\nenvironment for clients (ray.init, ray job ...):\n  export {env_text} "
          f"PATH={shlex.quote(str(Path(cluster.ray).parent))}:$PATH")
    bare_url = f"redis://127.0.0.1:{server.port}/0"
    print(f"  redis:     redis.url={bare_url} redis.password_env={PASSWORD_ENV} (the nodes have it set; for a "
          f"driver of your own: export {PASSWORD_ENV}=\"$({sys.executable} {__file__} password{_state_opt(args)})\")")
    print(f"\nsubmit a job (from the repository root):\n  {env_text} {ray} job submit --address "
          f"{cluster.dashboard_url} --working-dir . -- \\\n"
          "    python -m jobs.distill --config examples/quickstart.yaml \\\n"
          # absolute: a job runs in a copy of the working dir that Ray deletes later
          f"    storage.path={shlex.quote(str(REPO / 'runs'))} storage.shared=true \\\n"
          f"    redis.url={bare_url} redis.password_env={PASSWORD_ENV} \\\n"
          "    teachers.0.resources.teacher=1 training.resources_per_worker.trainer=1")
    print(f"\nstatus / stop:\n  {sys.executable} {__file__} status{_state_opt(args)}\n"
          f"  {sys.executable} {__file__} down{_state_opt(args)}")
    return 0


def _state_opt(args) -> str:
    return "" if args.state == DEFAULT_STATE else f" --state {shlex.quote(args.state)}"


def password(args) -> int:
    """The cluster's Redis password on stdout, for `export BACKPACK_REDIS_PASSWORD=$(... password)`."""
    state = read_state(args.state)
    if state is None:
        print(f"no local cluster recorded in {args.state}", file=sys.stderr)
        return 1
    print(state["env"].get(PASSWORD_ENV, ""))
    return 0


def status(args) -> int:
    state = read_state(args.state)
    if state is None:
        print(f"no local cluster recorded in {args.state}")
        return 1
    cluster = LocalCluster.from_state(state)
    if not is_up(cluster):
        print(f"the local cluster recorded in {args.state} ({state['address']}) does not answer; `down` clears it")
        return 1
    print(f"address {cluster.address}, dashboard {cluster.dashboard_url}; live nodes:")
    print_nodes(cluster)
    return 0


def down(args) -> int:
    state = read_state(args.state)
    if state is None:
        print(f"no local cluster recorded in {args.state}: nothing to stop")
        return 0
    cluster = LocalCluster.from_state(state)
    redis_pid = (state.get("redis") or {}).get("pid")
    if redis_pid and _is_redis(redis_pid):
        try:
            os.kill(redis_pid, signal.SIGTERM)  # redis flushes its AOF on SIGTERM and exits
        except ProcessLookupError:
            pass
    left = cluster.stop()
    Path(args.state).unlink(missing_ok=True)
    if left:
        print(f"stopped, but processes {left} did not exit", file=sys.stderr)
        return 1
    print(f"stopped the local cluster at {state['address']} ({len(state['nodes'])} nodes); nothing of it is left")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["up", "status", "down", "password"])
    ap.add_argument("--state", default=DEFAULT_STATE, help=f"state file (default {DEFAULT_STATE})")
    ap.add_argument("--worker", action="append", type=parse_resources, metavar="NAME=N[,NAME=N]",
                    help="a worker node with these custom resources (repeat per node; default: "
                         "--worker teacher=1 --worker trainer=1)")
    ap.add_argument("--cpus", type=int, default=2, help="logical CPUs per worker node (default 2)")
    ap.add_argument("--head-cpus", type=int, default=None, help="logical CPUs of the head (default: --cpus)")
    ap.add_argument("--head-resources", type=parse_resources, default=None, metavar="NAME=N[,NAME=N]")
    ap.add_argument("--timeout", type=float, default=180, help="seconds for every node to come up (default 180)")
    args = ap.parse_args(argv)
    try:
        return {"up": up, "status": status, "down": down, "password": password}[args.command](args)
    except (BackpackError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
