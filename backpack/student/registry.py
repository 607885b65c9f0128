"""Registry: student versions of a run.

Each published checkpoint becomes version N (1, 2, ...; version 0 is the untrained base): its files are copied
to `<run files>/students/v<N>/` (trainable weights as safetensors + state.json; a local folder or an object
store, see backpack.data.storage), its metadata (version, step,
dataset version, metrics, base and tokenizer fingerprints) goes to a Redis hash, and an event is appended to the
run's Redis stream `backpack:<run>:events`, which later services (server, continual evaluator) follow.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from backpack.data.storage import RunFiles, local_folder
from backpack.runtime.redis_server import RunRedis
from backpack.student import checkpoints

# The next version number: past the counter and past every version folder in storage (the counter alone is
# gone with a lost Redis, and a reused number would overwrite weights that remote caches keep serving).
_NEXT = """
local n = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[1])
if n <= floor then
  n = floor + 1
  redis.call('SET', KEYS[1], n)
end
return n
"""


# Compare-and-set of the live version (ARGV[2]: the expected live version, "" for none, "*" for any).
_PROMOTE = """
if ARGV[2] ~= '*' and (redis.call('GET', KEYS[1]) or '') ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[3], '*', 'type', 'promoted', 'version', ARGV[1], 'by', ARGV[3], 'reason', ARGV[4])
return 1
"""
ANY = object()  # Registry.promote(if_live=ANY): whatever is live


class Registry(RunRedis):
    """Picklable (it connects lazily), so a Ray Train worker can publish versions as checkpoints are made."""

    def __init__(self, redis_url: str, run: str, run_files: RunFiles | str | Path):
        super().__init__(redis_url, run)
        self.files = RunFiles.of(run_files).sub("students")

    def publish(self, checkpoint_dir: str | Path, state: dict, base_fingerprint: str = "",
                tokenizer_fingerprint: str = "") -> int:
        """Copy a checkpoint's weights in as a new version; record it in Redis; emit an event. The version is
        visible (Redis) only after its files are written; a number is never reused (not even after the Redis
        state is lost: numbering goes on past the folders in storage), so a publish that died half way leaves an
        unlisted folder, never a listed half version, and no version's files are ever overwritten."""
        version = self._next_version()
        target = f"v{version}"
        for name in (checkpoints.WEIGHTS, checkpoints.STATE):
            self.files.write_bytes(f"{target}/{name}", (Path(checkpoint_dir) / name).read_bytes())
        meta = {"version": version, "step": state.get("step"), "dataset_version": state.get("dataset_version"),
                "metrics": {k: v for k, v in state.items() if isinstance(v, (int, float))},
                "student": state.get("student"), "base_fingerprint": base_fingerprint,
                "tokenizer_fingerprint": tokenizer_fingerprint, "path": self.files.uri(target),
                "created_at": time.time(), **({"lineage": state["lineage"]} if state.get("lineage") else {})}
        self.files.write_text(f"{target}/version.json", json.dumps(meta, indent=1))
        self.client.hset(self.keys("students", f"v{version}"), mapping={"meta": json.dumps(meta)})
        self.client.xadd(self.keys("events"), {"type": "student_version", "version": version,
                                               "step": str(state.get("step"))})
        return version

    def stored_versions(self) -> list[int]:
        """The version numbers that have a folder in storage (listed in Redis or not)."""
        names = {rel.split("/", 1)[0] for rel in self.files.glob("", "")}
        return sorted(int(n[1:]) for n in names if n[:1] == "v" and n[1:].isdigit())

    def _next_version(self) -> int:
        floor = max(self.stored_versions(), default=0)
        version = int(self.client.eval(_NEXT, 1, self.keys("students", "next"), floor))
        while self.files.exists(f"v{version}"):  # a folder made since the listing: never write into it
            version = int(self.client.eval(_NEXT, 1, self.keys("students", "next"), version))
        return version

    def get(self, version: int) -> dict:
        """A version's metadata, with meta["gate"]: the promotion gate's record of it (None: not judged yet)."""
        raw, gate = self.client.hmget(self.keys("students", f"v{version}"), ["meta", "gate"])
        if raw is None:
            raise KeyError(f"no student version {version} in run {self.run!r}")
        return {**json.loads(raw), "gate": json.loads(gate) if gate is not None else None}

    def versions(self) -> list[dict]:
        n = int(self.client.get(self.keys("students", "next")) or 0)
        out = []
        for v in range(1, n + 1):
            try:
                out.append(self.get(v))
            except KeyError:  # a publish that died between INCR and HSET
                continue
        return out

    def latest(self) -> Optional[dict]:
        vs = self.versions()
        return vs[-1] if vs else None

    # ------------------------------------------------------------ the live (served) version

    def live(self) -> Optional[int]:
        """The version the StudentServer serves (None: none promoted yet; the server then serves version 0)."""
        raw = self.client.get(self.keys("students", "live"))
        return int(raw) if raw is not None else None

    def promote(self, version: int, by: str = "user", reason: str = "", if_live: object = ANY) -> bool:
        """Make `version` the live one (0 = the untrained base): record it, keep the history for rollback, and
        emit a `promoted` event that servers follow. With `if_live` (a version, or None: none live yet) only if
        the live version is still that one, in one atomic step: the gate's decision, made while it scored, never
        overrides a promote or rollback made meanwhile. Returns whether it promoted."""
        if version != 0:
            self.get(version)  # KeyError naming the version if it does not exist
        expected = "*" if if_live is ANY else ("" if if_live is None else str(int(if_live)))
        k = self.keys
        done = self.client.eval(_PROMOTE, 3, k("students", "live"), k("students", "live_history"), k("events"),
                                version, expected, by, reason[:500])
        return bool(int(done))

    def rollback(self, by: str = "user") -> int:
        """Serve the version that was live before the current one; returns it. ValueError if there is none."""
        history = [int(v) for v in self.client.lrange(self.keys("students", "live_history"), 0, -1)]
        if len(history) < 2:
            raise ValueError(f"run {self.run!r} has no earlier live version to roll back to "
                             f"(live history: {history or 'empty'})")
        target = history[-2]
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys("students", "live"), target)
        pipe.rpop(self.keys("students", "live_history"))  # the history reads as if the bad version never was
        pipe.xadd(self.keys("events"), {"type": "promoted", "version": target, "by": by, "reason": "rollback"})
        pipe.execute()
        return target

    def set_gate(self, version: int, record: dict) -> None:
        """Store the promotion gate's record of `version` (JSON in its hash, field "gate"; a later judgement of
        the same version replaces it) and emit a `gate` event with its decision ("promoted" | "kept")."""
        self.get(version)  # KeyError naming the version if it does not exist
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys("students", f"v{version}"), "gate", json.dumps(record))
        pipe.xadd(self.keys("events"), {"type": "gate", "version": version, "decision": record["decision"],
                                        "reason": str(record.get("reason", ""))[:500]})
        pipe.execute()

    def events(self, after: str = "-", count: int = 100) -> list[tuple[str, dict]]:
        """Registry events after stream id `after` ("-" = from the start)."""
        start = "-" if after == "-" else f"({after}"
        return self.client.xrange(self.keys("events"), min=start, count=count)

def load_version(meta: Optional[dict], student_cfg=None, merge: bool = False, device: str = "cpu"):
    """A ready-to-generate Autopilot for a version: `meta` is its version.json (or Registry.get(N)); None is
    version 0, the untrained base of `student_cfg`. The version's own student config wins over `student_cfg`.
    With `merge`, LoRA adapters are folded into the base weights (a plain transformers model, faster to
    generate)."""
    from backpack.config import StudentConfig
    from backpack.student.autopilot import load_student

    cfg = StudentConfig(**meta["student"]) if meta and meta.get("student") else student_cfg
    if cfg is None:
        raise ValueError("load_version needs a version's metadata or a student config")
    ap = load_student(cfg, device=device)
    if meta is not None:
        checkpoints.load_weights(local_folder(meta["path"]), ap.model)  # a URI: downloaded once, then cached
    if merge and cfg.mode == "lora":
        ap.model = ap.model.merge_and_unload()
    ap.model.eval()
    return ap
