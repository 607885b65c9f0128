"""The promotion gate of a continual run: a new student version is served only if it is not worse than the live one.

`decide` is the pure rule: on `continual.promote_metric` (nll and kl: lower is better; chrf: higher is
better), the candidate is promoted when it is not worse than the live version by more than
`continual.promote_margin`. `Gate.judge(version)` measures both versions on the same held-out rows (the first
`continual.gate_rows` held-out answered rows of the dataset, in store order), decides, promotes through the
Registry (which the StudentServer follows), and records its decision on the version in Redis (`Registry.set_gate`:
the version hash's "gate" field and a `gate` event), so `backpack versions` can say why a version is or is not
served.

Each version's score is cached on disk under `<run_dir>/eval/gate/`, keyed by the version and a hash of the
gate rows and the settings that change the score, so the live version is measured once while the rows stay
the same, however many candidates are judged against it.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from backpack.config import RunConfig
from backpack.data.splits import split
from backpack.data.store import DatasetStore

METRICS = {"nll": "nll", "kl": "kl_to_teacher", "chrf": "chrf"}   # gate metric -> evaluate_model key
LOWER_IS_BETTER = {"nll": True, "kl": True, "chrf": False}


@dataclass(frozen=True)
class Decision:
    """The gate's verdict: whether to serve the candidate, and one human line saying why."""

    promote: bool
    reason: str


def decide(metric: str, candidate: float, live: float, margin: float) -> Decision:
    """Promote `candidate` unless it is worse than `live` by more than `margin` on `metric`.

    nll and kl: promoted when candidate <= live + margin; chrf: when candidate >= live - margin. A candidate
    that is not a finite number (NaN, inf: a diverged model, or a metric the data cannot give) is never
    promoted; a finite candidate beats a live version whose score is not finite."""
    if metric not in LOWER_IS_BETTER:
        raise ValueError(f"unknown gate metric {metric!r} (choose from {', '.join(LOWER_IS_BETTER)})")
    if not margin >= 0:
        raise ValueError(f"the gate margin must be >= 0 (got {margin!r})")
    if not math.isfinite(candidate):
        return Decision(False, f"{metric} of the candidate is {candidate} (live {live:.4f}): not a score to serve")
    if not math.isfinite(live):
        return Decision(True, f"{metric} {candidate:.4f} against a live {metric} of {live}: any finite score is better")
    if LOWER_IS_BETTER[metric]:
        ok, op, bound = candidate <= live + margin, ("<=" if candidate <= live + margin else ">"), "+"
    else:
        ok, op, bound = candidate >= live - margin, (">=" if candidate >= live - margin else "<"), "-"
    verdict = "not worse than live by more than the margin" if ok else "worse than live by more than the margin"
    return Decision(ok, f"{metric} {candidate:.4f} {op} live {live:.4f} {bound} margin {margin:.4f}: {verdict}")


def _finite_or_none(x: Optional[float]) -> Optional[float]:
    """Records are JSON read by other tools: NaN and inf are not JSON numbers (the reason still names them)."""
    return x if x is not None and math.isfinite(x) else None


class Gate:
    """Judges published versions of a run against its live version. A plain class: run it in the driver, in a
    thread, or make it an actor where the run is assembled. Picklable (the Registry connects lazily)."""

    def __init__(self, cfg: RunConfig, registry, cache_dir: Optional[str | Path] = None, threads: int = 1):
        if not cfg.given("student"):
            raise ValueError(f"run {cfg.name!r} has no student section: the gate has no base to load")
        self.cfg = cfg
        self.registry = registry
        self.cc, self.ec = cfg.continual, cfg.eval
        self.max_len, self.top_k = cfg.training.max_len, cfg.training.top_k
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cfg.run_dir / "eval" / "gate"
        self.threads = threads
        self.evaluations = 0  # versions actually measured (not read from the cache) by this Gate

    # ------------------------------------------------------------ rows and scores

    def gate_rows(self) -> list[dict]:
        """The first `gate_rows` held-out answered rows of the dataset in the order they were stored (the same
        held-out split training leaves out); [] while the dataset has none. Store order, so the rows stop
        changing once there are enough of them, and the live version's cached score stays valid."""
        store = DatasetStore(str(self.cfg.dataset_dir), create=False)
        if store.version == 0:  # split refuses an empty dataset; for the gate it just means "not yet"
            return []
        _, held = split(store, self.ec.heldout_fraction)
        return held[: self.cc.gate_rows]

    def _cache_path(self, version: int, meta: Optional[dict], rows: list[dict]) -> Path:
        """One file per (version, rows, metric and the settings that change it). The version's creation time
        and student are in the key so a version number reused by a fresh Redis, or a version 0 of another
        student base, never reads an older score."""
        metric = self.cc.promote_metric
        settings = [self.max_len, self.top_k] + ([self.ec.max_new_tokens] if metric == "chrf" else [])
        ids = [[r["query_id"], r["sample_index"], r["teacher"]] for r in rows]
        who = [meta.get("created_at"), meta.get("student")] if meta else [None, self.cfg.student.model_dump()]
        key = hashlib.sha256(json.dumps([ids, metric, settings, who]).encode()).hexdigest()[:16]
        return self.cache_dir / f"v{version}-{metric}-{key}.json"

    def score(self, version: int, rows: list[dict]) -> float:
        """`version`'s promote_metric on `rows` (0 = the untrained base), from the cache when measured before."""
        meta = self.registry.get(version) if version != 0 else None
        path = self._cache_path(version, meta, rows)
        if path.exists():
            return float(json.loads(path.read_text())["value"])
        from backpack.eval.evaluate import evaluate_model
        from backpack.student.registry import load_version

        metric = self.cc.promote_metric
        ap = load_version(meta, self.cfg.student, merge=True)
        # nll and kl need one teacher-forced pass; only chrf pays for greedy generation
        m = evaluate_model(ap.model, ap.tokenizer, rows, f"gate-v{version}", self.ec.max_new_tokens, self.max_len,
                           top_k=self.top_k, batch_size=self.ec.batch_size, generate=metric == "chrf")
        self.evaluations += 1
        value = float(m[METRICS[metric]])
        m.pop("samples", None)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": version, "metric": metric, "value": value, "metrics": m}))
        tmp.rename(path)  # a reader never sees half a file
        return value

    # ------------------------------------------------------------ judging

    def judge(self, version: int) -> dict:
        """Measure `version` and the live version (version 0, the base, when none is live) on the gate rows,
        promote `version` when `decide` says so, and record the decision on the version (Registry.set_gate).
        Returns the record: {"version", "live_version", "metric", "candidate", "live", "margin", "rows",
        "decision" ("promoted" | "kept"), "reason", "seconds"}. With no held-out rows yet the version is kept
        unserved (the reason says so) and the caller judges it again once data has landed."""
        import torch

        t0 = time.perf_counter()
        self.registry.get(version)  # KeyError naming the version if it does not exist
        live_now = self.registry.live()
        live_version = live_now or 0
        if version == live_version:
            raise ValueError(f"version {version} is already live: the gate judges new versions against it")
        record = {"version": version, "live_version": live_version, "metric": self.cc.promote_metric,
                  "candidate": None, "live": None, "margin": self.cc.promote_margin}
        rows = self.gate_rows()
        if not rows:
            decision = Decision(False, f"no held-out rows yet (eval.heldout_fraction={self.ec.heldout_fraction}): "
                                       "not served; judge it again once more data has landed")
        else:
            before = torch.get_num_threads()
            torch.set_num_threads(self.threads)  # the gate shares the machine with the trainer and teachers
            try:
                candidate, live = self.score(version, rows), self.score(live_version, rows)
            finally:
                torch.set_num_threads(before)
            decision = decide(self.cc.promote_metric, candidate, live, self.cc.promote_margin)
            if self.cc.promote_metric == "kl" and not all(r["top_ids"] for r in rows):
                decision = Decision(False, decision.reason + " (kl needs the teacher's top-k logprobs on every gate "
                                                             "row: generate with decoding.logprobs >= training.top_k)")
            record.update(candidate=_finite_or_none(candidate), live=_finite_or_none(live))
        if decision.promote and not self.registry.promote(version, by="gate", reason=decision.reason,
                                                          if_live=live_now):
            decision = Decision(False, f"the live version changed while the gate scored (it was {live_version}, "
                                       f"now {self.registry.live()}: a promote or rollback): not promoted")
        record.update(rows=len(rows), decision="promoted" if decision.promote else "kept", reason=decision.reason)
        record["seconds"] = round(time.perf_counter() - t0, 3)
        self.registry.set_gate(version, record)  # after promote: a "promoted" record is always true
        return record


class GateWatcher:
    """Judges each version a continual run's trainer publishes (promote or keep), in order, in a thread of the
    driver. Nothing ends the thread but `stop`: a Redis hiccup or a broken version is reported and retried."""

    def __init__(self, cfg: RunConfig, registry, store: DatasetStore, report: Callable[[str], None],
                 interval_s: float = 1.0):
        self.cfg, self.registry, self.store, self.report, self.interval_s = cfg, registry, store, report, interval_s
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="promotion-gate", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=120)

    def _loop(self) -> None:
        gate = Gate(self.cfg, self.registry, threads=1)
        waiting_for_rows = None  # (version, dataset version) of a version kept for want of held-out rows
        while not self._stop.is_set():
            version = None
            try:
                version = self.next_version()
                data = self.store.version
                if version is None or waiting_for_rows == (version, data):
                    self._stop.wait(self.interval_s)
                    continue
                record = gate.judge(version)
                self.report(f"student version {version}: {record['decision']} ({record['reason']})")
                waiting_for_rows = (version, data) if not record["rows"] else None
            except Exception as e:  # noqa: BLE001
                self.report(f"the promotion gate could not judge version {version}: {type(e).__name__}: {e}")
                self._stop.wait(self.interval_s * 10)

    def next_version(self) -> Optional[int]:
        """The newest version newer than the live one that is not judged yet (or was kept only for want of
        held-out rows). Older unjudged versions are superseded by it: judging them would only delay it."""
        live = self.registry.live() or 0
        for meta in sorted(self.registry.versions(), key=lambda m: -m["version"]):
            if meta["version"] <= live:
                return None
            gate = meta.get("gate")
            if gate is None or (gate.get("decision") == "kept" and not gate.get("rows")):
                return meta["version"]
            return None  # the newest version is judged: nothing to do until the next one
        return None

