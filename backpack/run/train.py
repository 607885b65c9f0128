"""`backpack train`: fit the run's student on its dataset with Ray Train.

Everything that can be checked is checked before Ray Train starts (a dataset with usable rows, a loadable
student, a tokenizer shared with the teachers when token-level KD is asked for, teacher logprobs deep enough);
then the student is fitted on the rows not held out, each checkpoint published as a registry version. A rerun
resumes from the run's latest checkpoint.
"""

from __future__ import annotations

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
from backpack.student.preflight import preflight


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
        ray_runtime.check_placement([], [tc.workers_group()])
        before = {m["version"] for m in registry.versions()}
        ds = training_dataset(store, cfg.eval.heldout_fraction, cfg.grounded_only)
        rep.stage(f"training the student ({tc.num_workers} worker(s), {tc.max_steps} steps"
                  + (f", resuming from step {resume[1]}" if resume else "") + ")")
        try:
            res = run_training(ds, cfg.student, tc, files.sub("train"), cfg.name,
                               resume_from=resume[0] if resume else None, dataset_version=store.version,
                               metrics_file=files.uri("train/metrics.jsonl"), same_tokenizer=same, registry=registry)
        except ray.train.TrainingFailedError as e:
            raise BackpackError(f"training failed after {tc.max_failures} restart(s): {cause_of(e)}; "
                                "rerun the same command to resume from the last checkpoint") from None
        new = [m["version"] for m in registry.versions() if m["version"] not in before]
    return {"step": res.step, "versions": new, "seconds": res.seconds}
