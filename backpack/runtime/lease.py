"""StorageLease: mutual exclusion on a store that has no lock (an object store), held by writing one object.

An object store offers no flock and (through pyarrow) no conditional PUT, but a PUT is atomic and a read after
it sees it (S3, GCS and Azure are strongly consistent). So a lease is taken by write-wait-verify: read the
lease object; if another holder's lease has not expired, it is held; else write ours (a random token, who and
until when), wait `settle_s` for a competing PUT in flight to land, and read it back: whoever's token is there
holds it, the other backs off. The holder renews it before it expires and deletes it when done; one that
crashed holds it until `ttl_s` passes. Expiry uses the writers' clocks: keep machines NTP-synced and the TTL
well above their skew.

Used for the run lock of a run whose storage is remote (one driver per run, across machines) and around each
append to a remote dataset (two writers never lose each other's shards).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from typing import Optional

import pyarrow.fs as pafs

from backpack.errors import DatasetError


class LeaseHeld(DatasetError):
    """The lease is held by someone else; `holder` says who (host, pid, what) and until when."""

    def __init__(self, path: str, holder: dict):
        self.holder = holder
        left = max(0.0, float(holder.get("expires_at", 0)) - time.time())
        super().__init__(f"{path} is held by {holder.get('what', '?')} on {holder.get('host', '?')} (pid "
                         f"{holder.get('pid', '?')}) for {left:.0f} s more unless renewed")


class StorageLease:
    def __init__(self, fs: pafs.FileSystem, path: str, what: str, ttl_s: float = 60.0, settle_s: float = 0.5):
        self.fs, self.path, self.what = fs, path, what
        self.ttl_s, self.settle_s = ttl_s, settle_s
        self.token = secrets.token_hex(16)
        self._stop = threading.Event()

    def _read(self) -> Optional[dict]:
        try:
            with self.fs.open_input_stream(self.path) as f:
                data = json.loads(f.read().decode("utf-8"))
            return data if isinstance(data, dict) else None
        except (OSError, ValueError, UnicodeDecodeError):  # none, gone meanwhile, or a torn read: nobody's lease
            return None

    def _write(self) -> None:
        record = {"token": self.token, "what": self.what, "host": socket.gethostname(), "pid": os.getpid(),
                  "expires_at": time.time() + self.ttl_s}
        with self.fs.open_output_stream(self.path) as f:
            f.write(json.dumps(record).encode("utf-8"))

    def _held_by_other(self) -> Optional[dict]:
        cur = self._read()
        if cur and cur.get("token") != self.token and float(cur.get("expires_at", 0)) > time.time():
            return cur
        return None

    def try_acquire(self) -> None:
        """Take the lease or raise LeaseHeld naming its holder."""
        holder = self._held_by_other()
        if holder is not None:
            raise LeaseHeld(self.path, holder)
        self._write()
        time.sleep(self.settle_s)
        cur = self._read()
        if not cur or cur.get("token") != self.token:
            raise LeaseHeld(self.path, cur or {})

    def acquire(self, wait_s: float) -> None:
        """Take the lease, waiting up to `wait_s` for its holder to release it (or for it to expire)."""
        deadline, delay = time.monotonic() + wait_s, 0.05
        while True:
            try:
                return self.try_acquire()
            except LeaseHeld:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(delay * (0.5 + secrets.randbelow(1000) / 1000))  # jitter: competitors drift apart
                delay = min(delay * 2, 1.0)

    def check(self) -> None:
        """Raise unless the lease is still ours (and unexpired): the fence before a write it protects."""
        cur = self._read()
        if not cur or cur.get("token") != self.token or float(cur.get("expires_at", 0)) <= time.time():
            raise DatasetError(f"lost the lease {self.path} (expired or taken by {(cur or {}).get('what', '?')} "
                               f"on {(cur or {}).get('host', '?')}): nothing written")

    def renew(self) -> None:
        self.check()
        self._write()

    def keep_renewed(self) -> None:
        """Renew every third of the TTL in a daemon thread until release()."""
        def loop():
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    self.renew()
                except (DatasetError, OSError):
                    pass  # a store hiccup: tried again at the next tick, while the TTL still covers it
        threading.Thread(target=loop, name="storage-lease", daemon=True).start()

    def release(self) -> None:
        self._stop.set()
        cur = self._read()
        if cur and cur.get("token") == self.token:
            try:
                self.fs.delete_file(self.path)
            except OSError:
                pass  # it expires by itself
