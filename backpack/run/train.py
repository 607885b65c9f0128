"""`backpack train`: fit the run's student on its dataset with Ray Train.

Everything that can be checked is checked before Ray Train starts (a dataset with usable rows, a loadable
student, a tokenizer shared with the teachers when token-level KD is asked for, teacher logprobs deep enough);
then the student is fitted on the rows not held out, each checkpoint published as a registry version. A rerun
resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import json
import threading
from typing import Optional

from backpack.config import RunConfig
from backpack.data.splits import split, training_dataset
from backpack.data.storage import run_files
from backpack.data.store import DatasetStore
from backpack.errors import BackpackError, cause_of
from backpack.runtime import ray_runtime
from backpack.runtime.progress import Reporter
from backpack.runtime.session import RunSession
from backpack.student.checkpoints import latest_checkpoint
from backpack.student.on_policy import ON_POLICY_DATASET
from backpack.student.preflight import preflight


class TrainingProgress:
    """A line on the reporter every `every` seconds while Ray Train runs (step, loss, throughput), read from the
    trainer's metrics file: a terminal, `make demo` and a Ray Job's log all see training move. Steps logged by
    an earlier run of the same name (a resume) are not reported again."""

    def __init__(self, files, rel: str, max_steps: int, rep: Reporter, every: float = 10.0):
        self.files, self.rel, self.max_steps, self.rep, self.every = files, rel, max_steps, rep, every
        self.last_step = self._latest().get("step", 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="training-progress", daemon=True)

    def _latest(self) -> dict:
        try:
            lines = (self.files.read_text(self.rel) or "").strip().splitlines()
            return json.loads(lines[-1]) if lines else {}
        except (OSError, ValueError):  # a line being written, or storage unreachable for a moment
            return {}

    def report(self) -> None:
        m = self._latest()
        if m.get("step", 0) > self.last_step:
            self.last_step = m["step"]
            self.rep.stage(f"training: step {m['step']}/{self.max_steps}, loss {m.get('loss', float('nan')):.3f}, "
                           f"{m.get('tokens_per_s', 0.0):.0f} tok/s")

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.report()

    def __enter__(self) -> "TrainingProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def start_scorers(session: RunSession, tc, files) -> dict:
    """The teachers, started beside the trainer, and a scheduler per training worker that routes the worker's
    samples to them and stores the scores in the run's on-policy dataset (backpack.student.on_policy)."""
    from backpack.run.generation import Generation

    gen = Generation(session)
    gen.check_placement(groups=[tc.workers_group()])
    gen.start_teachers()
    store = DatasetStore(files.uri(ON_POLICY_DATASET))
    return {"schedulers": [gen.spawn_scheduler(store, None) for _ in range(tc.num_workers)],
            "store": files.uri(ON_POLICY_DATASET)}


def train(cfg: RunConfig, reporter: Optional[Reporter] = None) -> dict:
    """Train the run's student on its dataset. Returns {"step", "versions", "seconds"}."""
    cfg.require("student", "training")
    rep = reporter or Reporter()
    files = run_files(cfg)
    with RunSession(cfg, rep) as session:
        store = DatasetStore(str(cfg.dataset_dir), create=False)
        train_rows, _ = split(store, cfg.eval.heldout_fraction)
        tc, same = preflight(cfg, train_rows, rep)
        resume = latest_checkpoint(files)
        if resume and resume[1] >= tc.max_steps:
            rep.stage(f"already trained to step {resume[1]} (training.max_steps={tc.max_steps}): nothing to do")
            return {"step": resume[1], "versions": [], "seconds": 0.0}
        import ray.train

        from backpack.student.registry import Registry
        from backpack.student.trainer import run_training

        registry = Registry(session.redis_url, cfg.name, files)
        session.connect_ray()
        on_policy = None
        if tc.objective == "off_policy":
            ray_runtime.check_placement([], [tc.workers_group()])
        else:  # the teachers score the student's samples while it trains
            on_policy = start_scorers(session, tc, files)
        before = {m["version"] for m in registry.versions()}
        ds = training_dataset(store, cfg.eval.heldout_fraction, cfg.grounded_only)
        rep.stage(f"training the student ({tc.num_workers} worker(s), {tc.max_steps} steps, {tc.objective}"
                  + (f", resuming from step {resume[1]}" if resume else "") + ")")
        try:
            with TrainingProgress(files, "train/metrics.jsonl", tc.max_steps, rep):
                res = run_training(ds, cfg.student, tc, files.sub("train"), cfg.name,
                                   resume_from=resume[0] if resume else None, dataset_version=store.version,
                                   metrics_file=files.uri("train/metrics.jsonl"), same_tokenizer=same,
                                   registry=registry, on_policy=on_policy)
        except ray.train.TrainingFailedError as e:
            raise BackpackError(f"training failed after {tc.max_failures} restart(s): {cause_of(e)}; "
                                "rerun the same command to resume from the last checkpoint") from None
        new = [m["version"] for m in registry.versions() if m["version"] not in before]
    return {"step": res.step, "versions": new, "seconds": res.seconds}
