"""Training a student on a run's dataset with Ray Train (TorchTrainer, DDP over `num_workers` workers).

The loop reads its shard of the DatasetStore through Ray Data, builds examples (prompt masked), accumulates
gradients over `grad_accum` micro-batches, follows a warmup + cosine/linear/constant schedule, reports metrics
every `log_every` steps and a checkpoint every `checkpoint_every` steps (and at the end). A worker failure
restarts the worker group from the last checkpoint (FailureConfig); a rerun of the same run passes its latest
checkpoint as `resume_from`.

`WorkerSession` (model, optimizer, restore, one micro-batch, one optimizer step, the metrics window, the
checkpoint-and-publish report) and `fit_workers` (the TorchTrainer run) are shared with the continual loop
(`backpack.student.continual`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from backpack.config import StudentConfig, TrainingConfig
from backpack.runtime.allocator import worker_env


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _rows(batch) -> list[dict]:
    return batch.to_pylist() if hasattr(batch, "to_pylist") else batch


def _timed(batches, window: dict):
    """Yield from `batches`, adding the time spent waiting for each to window["data_s"]: with the batch
    building time, that is how long the step waited for its input (a slow input pipeline shows there)."""
    it = iter(batches)
    while True:
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        window["data_s"] += time.perf_counter() - t
        yield batch


def _empty_window() -> dict:
    return {"loss": 0.0, "ce": 0.0, "kd": 0.0, "micro": 0, "tokens": 0, "data_s": 0.0, "compute_s": 0.0,
            "t0": time.perf_counter()}


class WorkerSession:
    """One Ray Train worker's student, optimizer and LR schedule, restored from the run's last checkpoint (a
    restarted worker group) or from `config["resume_from"]` (a rerun), with its metrics window.

    `schedule` overrides training.schedule (the continual loop has no total step count: "constant").
    `state` is the restored checkpoint's state dict (None on a fresh start)."""

    def __init__(self, config: dict, schedule: Optional[str] = None):
        import ray.train
        import torch

        from backpack.data.storage import local_folder
        from backpack.runtime.allocator import loaded_allocator
        from backpack.student import checkpoints
        from backpack.student.autopilot import load_student

        self.config = config
        tc = self.tc = TrainingConfig(**config["training"])
        torch.set_num_threads(tc.threads_per_worker)
        torch.manual_seed(tc.seed)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = "cuda" if tc.use_gpu and torch.cuda.is_available() else "cpu"
        self.student = load_student(StudentConfig(**config["student"]), device=self.device)
        self.model = ray.train.torch.prepare_model(self.student.model) if self.world > 1 else self.student.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
        schedule = schedule or tc.schedule
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, tc.warmup_steps, tc.max_steps, schedule))
        restored = ray.train.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as d:
                self.state = checkpoints.load(d, self.model, self.opt, self.sched)
        elif config.get("resume_from"):  # a local folder or a URI (downloaded once)
            self.state = checkpoints.load(local_folder(config["resume_from"]), self.model, self.opt, self.sched)
        else:
            self.state = None
        self.step = self.state["step"] if self.state else 0
        self.tokens_seen = self.state.get("tokens_seen", 0) if self.state else 0
        self.use_kd = tc.kd_weight > 0
        self.same_tok = config.get("same_tokenizer", True)  # False: re-tokenise the teacher's text (no token KD)
        self.window = _empty_window()
        self.micro = 0
        self.allocator = loaded_allocator()  # reported with the metrics: did training.allocator reach this worker?
        self.last_metrics: Optional[dict] = None
        self.model.train()

    def examples(self, rows: list[dict], on_policy: bool = False) -> list:
        """The usable training Examples of dataset rows (failed rows and over-long prompts are left out)."""
        from backpack.student.examples import build_examples

        return build_examples(rows, self.student.tokenizer, self.tc.max_len, self.same_tok or on_policy,
                              self._needs_top_k(on_policy))[0]

    def _needs_top_k(self, on_policy: bool) -> bool:
        """Whether a batch's teacher top-k is trained on: token-level KD, or an on-policy divergence."""
        return self.use_kd or (on_policy and self.tc.on_policy.loss != "sampled")

    def forward_backward(self, examples: list, since: Optional[float] = None, on_policy: bool = False) -> None:
        """One micro-batch: loss, backward (scaled by 1/grad_accum), window sums. `since`: when building the
        batch began (that time counts as data time). `on_policy`: the examples are the student's own scored
        samples (step.on_policy_loss), else teacher answers (step.student_loss)."""
        from backpack.student.examples import collate
        from backpack.student.step import on_policy_loss, student_loss

        tc, window = self.tc, self.window
        built = time.perf_counter() if since is None else since
        top_k = tc.top_k if self._needs_top_k(on_policy) else 0
        tensors = {k: v.to(self.device) for k, v in
                   collate(examples, self.student.tokenizer.pad_token_id, top_k).items()}
        computed = time.perf_counter()
        window["data_s"] += computed - built
        if on_policy:
            loss, m = on_policy_loss(self.model, tensors, tc.on_policy.loss, tc.beta)
        else:
            loss, m = student_loss(self.model, tensors, tc.kd_weight, tc.divergence, tc.beta)
        (loss / tc.grad_accum).backward()
        window["loss"] += loss.item()
        window["ce"] += m["ce"]
        window["kd"] += m["kd"]
        window["micro"] += 1
        window["tokens"] += m["tokens"]
        self.micro += 1
        window["compute_s"] += time.perf_counter() - computed

    def optimizer_step(self) -> None:
        """Clip, step the optimizer and the LR schedule, count the step; then the crash test hook."""
        import torch

        t = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.window["compute_s"] += time.perf_counter() - t
        self.step += 1
        marker = self.config.get("fail_once_at_step_marker")  # test hook: crash one worker once, mid-run
        if marker and self.step == self.config.get("fail_once_at_step") and self.rank == 0 \
                and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)  # a hard crash, as if the worker's node went away

    def window_metrics(self) -> dict:
        """Metrics of the steps since the last call (loss means, throughput, time waiting for data); resets
        the window."""
        w = self.window
        self.tokens_seen += w["tokens"]
        seconds = time.perf_counter() - w["t0"]
        n = max(1, w["micro"])
        metrics = {"step": self.step, "loss": w["loss"] / n, "ce": w["ce"] / n, "kd": w["kd"] / n,
                   "lr": self.sched.get_last_lr()[0], "tokens_per_s": w["tokens"] / seconds if seconds else 0.0,
                   "tokens_seen": self.tokens_seen, "data_wait_s": w["data_s"], "compute_s": w["compute_s"],
                   "window_s": seconds, "allocator": self.allocator}
        self.window = _empty_window()
        return metrics

    def report(self, metrics: dict, checkpoint_state: Optional[dict] = None, publish: bool = True) -> None:
        """Append `metrics` to the metrics file (rank 0) and report them to Ray Train. With `checkpoint_state`
        (extra state keys, e.g. the dataset version) also save a checkpoint, and, with `publish` and a
        registry, publish it as a student version. Every worker must call this at the same step."""
        import ray.train

        from backpack.data.storage import append_text
        from backpack.student import checkpoints

        self.last_metrics = metrics
        config = self.config
        if self.rank == 0 and config.get("metrics_file"):  # a local path or a URI
            append_text(config["metrics_file"], json.dumps(metrics) + "\n")
        if checkpoint_state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            state = {**metrics, "student": config["student"], **checkpoint_state}
            if self.rank == 0:
                checkpoints.save(d, self.model, state, self.opt, self.sched)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if self.rank == 0 else None)
            # Published only once Ray Train holds the checkpoint: a crash before this point resumes from the
            # previous checkpoint and publishes the redone steps once; a crash after it loses at most this one
            # version, never numbers a step twice.
            if self.rank == 0 and publish and config.get("registry") is not None:
                config["registry"].publish(d, state, self.student.base.fingerprint,
                                           self.student.tokenizer_fingerprint)


def micro_batch(s: WorkerSession, rows: list[dict], on_policy, built: float, examples: Optional[list] = None) -> bool:
    """One micro-batch of `rows`: on the student's own scored samples when `on_policy` (an OnPolicyWorker) says
    this one is, else on the teachers' answers (`examples` when already built from the rows; also when no sample
    of the batch could be scored: every DDP rank must take part in each backward). Returns whether there was
    anything to learn from."""
    if on_policy is not None and on_policy.on_policy_now(s.tc.objective):
        scored = s.examples(on_policy.next_batch(rows, s.step), on_policy=True)
        if scored:
            on_policy.counts["on_policy_batches"] += 1
            s.forward_backward(scored, since=built, on_policy=True)
            return True
    examples = s.examples(rows) if examples is None else examples
    if not examples:
        return False
    if on_policy is not None:
        on_policy.counts["off_policy_batches"] += 1
    s.forward_backward(examples, since=built)
    return True


def train_loop_per_worker(config: dict) -> None:
    """Runs inside each Ray Train worker. `config` holds plain dicts (student, training) and paths."""
    import ray.train

    s = WorkerSession(config)
    tc = s.tc
    on_policy = None
    if tc.objective != "off_policy":
        from backpack.student.on_policy import OnPolicyWorker

        on_policy = OnPolicyWorker(s, config)
    shard = ray.train.get_dataset_shard("train")
    while s.step < tc.max_steps:
        any_batch = False
        for batch in _timed(shard.iter_batches(batch_size=tc.batch_size, batch_format="pyarrow"), s.window):
            if not micro_batch(s, _rows(batch), on_policy, time.perf_counter()):
                continue
            any_batch = True
            if s.micro % tc.grad_accum:
                continue
            s.optimizer_step()
            last = s.step >= tc.max_steps
            if s.step % tc.log_every and s.step % tc.checkpoint_every and not last:
                continue
            checkpoint = s.step % tc.checkpoint_every == 0 or last
            metrics = {**s.window_metrics(), **(on_policy.counts if on_policy else {})}
            state = {"dataset_version": config.get("dataset_version"),
                     **(on_policy.checkpoint_state() if on_policy else {})}
            s.report(metrics, checkpoint_state=state if checkpoint else None)
            if last:
                break
        if not any_batch:
            raise ValueError("the dataset shard of this worker holds no usable rows")


@dataclass
class TrainResult:
    checkpoint: Optional[str]      # directory of the final checkpoint
    step: int
    metrics: dict
    seconds: float


def _checkpoint_location(files, path: str) -> str:
    """A checkpoint Ray Train reports (a path inside the storage filesystem) as a local path or a URI."""
    base = files.path()
    return files.uri(path[len(base):]) if path.startswith(base) else path


# Ray Train's controller moves a run through its states (workers starting, running, done, shut down) one poll of
# the worker group at a time, every 2 s by default: 4-5 s of every fit here were spent waiting for the next poll
# after the loop had ended (a no-op fit: 14-16 s at 2 s, 8-12 s at 0.2 s). 1 s halves that wait; polling
# faster measured no better for training itself (benchmarks/train.py, one worker: 0.97x the plain loop at 1 s,
# 0.78-0.88x at 0.25 s, 0.88x at 2 s; noisy). Set in the driver's environment, which Ray Train passes on to its
# controller; a user's own value wins (the tests use 0.25 s: they train a few steps at a time).
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
DEFAULT_POLL_INTERVAL_S = "1.0"


def fit_workers(loop: Callable[[dict], None], config: dict, training: TrainingConfig, storage,
                name: str, datasets: Optional[dict] = None) -> TrainResult:
    """Run `loop(config)` on `training.num_workers` Ray Train workers (fractional CPUs each, the allocator
    env of training.allocator) as a new Ray Train run with a unique name under `storage` (a local folder, a URI
    or a RunFiles), restarting the worker group from its last checkpoint up to training.max_failures times."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from backpack.data.storage import RunFiles

    t0 = time.perf_counter()
    files = RunFiles.of(storage)
    files.fs.create_dir(files.path(), recursive=True)
    env = worker_env(training.allocator)  # before Ray Train starts: a missing tcmalloc is a clear error
    os.environ.setdefault(POLL_INTERVAL_ENV, DEFAULT_POLL_INTERVAL_S)
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=training.num_workers, use_gpu=training.use_gpu,
                                               resources_per_worker={"CPU": training.cpus_per_worker,
                                                                     **training.resources_per_worker},
                                               placement_strategy=training.placement.upper()),
        run_config=ray.train.RunConfig(
            name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=files.path(),
            storage_filesystem=None if files.local else files.fs,
            failure_config=ray.train.FailureConfig(max_failures=training.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env}),
        datasets=datasets,
    )
    result = trainer.fit()
    ckpt = result.checkpoint and _checkpoint_location(files, result.checkpoint.path)
    return TrainResult(ckpt, int((result.metrics or {}).get("step", 0)), dict(result.metrics or {}),
                       time.perf_counter() - t0)


def run_training(dataset, student: StudentConfig, training: TrainingConfig, storage: str | os.PathLike,
                 name: str, resume_from: Optional[str] = None, dataset_version: Optional[int] = None,
                 metrics_file: Optional[str] = None, same_tokenizer: bool = True, registry=None,
                 on_policy: Optional[dict] = None, test_hooks: Optional[dict] = None) -> TrainResult:
    """Fit the student on `dataset` (a Ray Dataset of DATASET_SCHEMA rows). Each call is a new Ray Train run
    with a unique name under `storage`; `resume_from` continues from an earlier run's checkpoint. With
    training.objective on_policy or mixed, `on_policy` holds {"schedulers": scheduler actors over the teachers
    (one per worker), "store": where the scored samples go} (backpack.student.on_policy)."""
    if training.objective != "off_policy" and not on_policy:
        raise ValueError(f"training.objective {training.objective} needs schedulers to score the samples")
    config = {"student": student.model_dump(), "training": training.model_dump(), "resume_from": resume_from,
              "dataset_version": dataset_version, "metrics_file": metrics_file, "same_tokenizer": same_tokenizer,
              "registry": registry, "on_policy": on_policy, **(test_hooks or {})}
    return fit_workers(train_loop_per_worker, config, training, storage, name, datasets={"train": dataset})
