"""What a command holds while it works on a run: the run lock, the run's Redis, the Ray connection.

`RunSession` is the one context manager every driver (generate, train, continual) opens: it takes the run lock,
starts or reaches the run's Redis on first use, connects to Ray with the checks a cluster needs before anything
is spawned, and releases all of it in reverse order on the way out, on error and on Ctrl-C too. Commands beside
a run (ingest, status, promote, evaluation) use `attach_redis`: the live run's Redis when there is one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from typing import Callable, Optional

import pyarrow.fs as pafs

from backpack.config import RunConfig
from backpack.core.redact import redact
from backpack.errors import BackpackError, InputError
from backpack.runtime import ray_runtime
from backpack.runtime.lease import LeaseHeld, StorageLease
from backpack.runtime.local_files import private_dirs
from backpack.runtime.progress import Reporter
from backpack.runtime.redis_server import EmbeddedRedis, connect, with_password

RUN_LEASE = "run.lease"  # in the run's storage (remote storage only): who runs it, until when
ENDPOINT_FILE = "endpoint.json"  # in <run_dir>/redis/: where a live run's embedded Redis listens


@contextlib.contextmanager
def run_lock(cfg: RunConfig):
    """Hold `<run_dir>/.lock` for the run: two runs of one name would write one dataset and one Redis AOF. The
    lock is an flock, gone with the process that held it: the file left behind after Ctrl-C or a crash is
    harmless (removing it would let a second run lock a new file while the first still holds the old).

    With a remote storage.path the run's folder here is this machine's only, so the lock is also a lease object
    in the run's storage (`run.lease`, see backpack.runtime.lease), renewed while the run goes on: a second driver
    of the run, on any machine, is refused while it is held."""
    try:
        private_dirs(cfg.run_dir)
    except OSError as e:
        raise InputError(f"storage.path: cannot create the run's folder {str(cfg.run_dir)!r}: "
                         f"{e.strerror or e}") from None
    path = cfg.run_dir / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise InputError(f"run {cfg.name!r} is already running (lock held on {path}, pid {f.read().strip()})") \
                from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        if not cfg.storage.remote:
            yield
            return
        with _storage_lease(cfg):
            yield


@contextlib.contextmanager
def _storage_lease(cfg: RunConfig):
    fs, root = pafs.FileSystem.from_uri(cfg.files_root)
    path = f"{root.rstrip('/')}/{RUN_LEASE}"
    lease = StorageLease(fs, path, what=f"run {cfg.name!r}", ttl_s=60.0, settle_s=1.0)
    try:
        lease.try_acquire()
    except LeaseHeld as e:
        raise InputError(f"run {cfg.name!r} is already running: {e}") from None
    except OSError as e:
        raise InputError(f"storage.path: cannot write the run's lease in {redact(cfg.files_root)!r}: {e}") from None
    lease.keep_renewed()
    try:
        yield
    finally:
        lease.release()


def _configured(cfg: RunConfig) -> str:
    """The configured Redis URL with its password from the environment, checked to answer."""
    url = with_password(cfg.redis.url, cfg.redis.password_env)
    connect(url).close()
    return url


@contextlib.contextmanager
def redis_for(cfg: RunConfig):
    """The run's Redis URL: an embedded server started for the run, or the configured one (checked).

    While an embedded server runs, `<run_dir>/redis/endpoint.json` (owner-only: the URL holds the password)
    says where, so `backpack ingest`, `status`, `promote`... reach the live run (see `attach_redis`)."""
    if cfg.redis.url is not None:
        yield _configured(cfg)
        return
    with EmbeddedRedis(cfg.run_dir / "redis") as server:
        endpoint = cfg.run_dir / "redis" / ENDPOINT_FILE
        fd = os.open(endpoint, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"url": server.url, "pid": os.getpid()}, f)
        try:
            yield server.url
        finally:
            endpoint.unlink(missing_ok=True)


def _live_endpoint(cfg: RunConfig) -> Optional[str]:
    """The URL of the embedded Redis of a live run of `cfg`, if one is running and answers."""
    path = cfg.run_dir / "redis" / ENDPOINT_FILE
    try:
        endpoint = json.loads(path.read_text())
        os.kill(int(endpoint["pid"]), 0)  # the run's process is alive (a stale file is left by a kill -9)
        connect(endpoint["url"], timeout=2.0).close()
        return endpoint["url"]
    except (OSError, ValueError, KeyError, BackpackError):
        return None


@contextlib.contextmanager
def attach_redis(cfg: RunConfig):
    """The run's Redis for a command beside the run (ingest, status, versions, promote, rollback, evaluation):
    the configured server; else the embedded server of the live run; else, with no run live, the run's embedded
    server started from its AOF for the command (under the run lock, so a run cannot start on it meanwhile)."""
    if cfg.redis.url is not None:
        yield _configured(cfg)
        return
    url = _live_endpoint(cfg)
    if url is not None:
        yield url
        return
    with run_lock(cfg), redis_for(cfg) as url:
        yield url


class RunSession:
    """One command's hold on a run (see the module docstring). Use as a context manager:

        with RunSession(cfg, reporter) as session:
            url = session.redis_url          # the run's Redis, started or checked on first use
            session.connect_ray()            # Ray, and the checks of a multi-node cluster
            session.on_exit(pool.shutdown)   # what the command spawned goes first, then Ray, Redis, the lock
    """

    def __init__(self, cfg: RunConfig, reporter: Optional[Reporter] = None):
        self.cfg, self.rep = cfg, reporter or Reporter()
        self._stack = contextlib.ExitStack()   # the lock, Redis, Ray: released in reverse order
        self._exits = contextlib.ExitStack()   # what the command spawned: stopped before any of those
        self._redis_url: Optional[str] = None
        self._ray = False

    def __enter__(self) -> "RunSession":
        self._stack.enter_context(run_lock(self.cfg))
        return self

    def __exit__(self, *exc) -> bool:
        with self._stack:
            self._exits.close()
        return False

    @property
    def redis_url(self) -> str:
        """The run's Redis (embedded for the run, or the configured server), kept until the session ends."""
        if self._redis_url is None:
            self._redis_url = self._stack.enter_context(redis_for(self.cfg))
        return self._redis_url

    def connect_ray(self) -> None:
        """Start a local Ray cluster or join the configured one (once per session), then refuse, before anything
        is spawned, a multi-node cluster with an embedded Redis or an unshared storage folder. Ray is left on
        the way out when this session started or joined it."""
        if self._ray:
            return
        ray_cfg = self.cfg.ray
        self.rep.stage("starting Ray" if ray_runtime.is_local(ray_cfg)
                       else f"connecting to Ray at {ray_runtime.target_address(ray_cfg)}")
        if ray_runtime.connect(ray_cfg):
            import ray

            self._stack.callback(ray.shutdown)
        self._ray = True
        ray_runtime.check_shared_state(self.cfg)

    def on_exit(self, fn: Callable, *args) -> None:
        """Call `fn(*args)` on the way out (the last registered first), before Ray, Redis and the lock go."""
        self._exits.callback(fn, *args)
