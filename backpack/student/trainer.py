"""Training a student on a run's dataset with Ray Train (TorchTrainer, DDP over `num_workers` workers).

The loop reads its shard of the DatasetStore through Ray Data, builds examples (prompt masked), accumulates
gradients over `grad_accum` micro-batches, follows a warmup + cosine/linear/constant schedule, reports metrics
every `log_every` steps and a checkpoint every `checkpoint_every` steps (and at the end). A worker failure
restarts the worker group from the last checkpoint (FailureConfig); a rerun of the same run passes its latest
checkpoint as `resume_from`.
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
from typing import Optional

from backpack.core.config import StudentConfig, TrainingConfig
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


def train_loop_per_worker(config: dict) -> None:
    """Runs inside each Ray Train worker. `config` holds plain dicts (student, training) and paths."""
    import ray.train
    import torch

    from backpack.runtime.allocator import loaded_allocator
    from backpack.student import checkpoints
    from backpack.student.autopilot import load_student
    from backpack.student.examples import build_examples, collate
    from backpack.student.step import student_loss

    tc = TrainingConfig(**config["training"])
    torch.set_num_threads(tc.threads_per_worker)
    torch.manual_seed(tc.seed)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = "cuda" if tc.use_gpu and torch.cuda.is_available() else "cpu"
    student = load_student(StudentConfig(**config["student"]), device=device)
    model = ray.train.torch.prepare_model(student.model) if ctx.get_world_size() > 1 else student.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, tc.warmup_steps, tc.max_steps, tc.schedule))
    step, tokens_seen = 0, 0
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            state = checkpoints.load(d, model, opt, sched)
    elif config.get("resume_from"):
        state = checkpoints.load(config["resume_from"], model, opt, sched)
    else:
        state = None
    if state:
        step, tokens_seen = state["step"], state.get("tokens_seen", 0)
    use_kd = tc.kd_weight > 0
    same_tok = config.get("same_tokenizer", True)  # False: re-tokenise the teacher's text (no token-level KD)
    shard = ray.train.get_dataset_shard("train")
    pad = student.tokenizer.pad_token_id
    window = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "micro": 0, "tokens": 0, "data_s": 0.0, "compute_s": 0.0,
              "t0": time.perf_counter()}
    fail_marker = config.get("fail_once_at_step_marker")  # test hook: crash one worker once, mid-run
    micro = 0
    allocator = loaded_allocator()  # reported with the metrics: did training.allocator reach this worker?
    model.train()
    while step < tc.max_steps:
        any_batch = False
        for batch in _timed(shard.iter_batches(batch_size=tc.batch_size, batch_format="pyarrow"), window):
            built = time.perf_counter()
            examples, _ = build_examples(_rows(batch), student.tokenizer, tc.max_len, same_tok, use_kd)
            if not examples:
                continue
            any_batch = True
            tensors = {k: v.to(device) for k, v in collate(examples, pad, tc.top_k if use_kd else 0).items()}
            computed = time.perf_counter()
            window["data_s"] += computed - built
            loss, m = student_loss(model, tensors, tc.kd_weight, tc.divergence, tc.beta)
            (loss / tc.grad_accum).backward()
            window["loss"] += loss.item()
            window["ce"] += m["ce"]
            window["kd"] += m["kd"]
            window["micro"] += 1
            window["tokens"] += m["tokens"]
            micro += 1
            if micro % tc.grad_accum:
                window["compute_s"] += time.perf_counter() - computed
                continue
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            window["compute_s"] += time.perf_counter() - computed
            step += 1
            if fail_marker and step == config.get("fail_once_at_step") and rank == 0 \
                    and not os.path.exists(fail_marker):
                Path(fail_marker).touch()
                os._exit(1)  # a hard crash, as if the worker's node went away
            last = step >= tc.max_steps
            if step % tc.log_every and step % tc.checkpoint_every and not last:
                continue
            tokens_seen += window["tokens"]
            seconds = time.perf_counter() - window["t0"]
            metrics = {"step": step, "loss": window["loss"] / max(1, window["micro"]),
                       "ce": window["ce"] / max(1, window["micro"]), "kd": window["kd"] / max(1, window["micro"]),
                       "lr": sched.get_last_lr()[0], "tokens_per_s": window["tokens"] / seconds if seconds else 0.0,
                       "tokens_seen": tokens_seen, "data_wait_s": window["data_s"], "compute_s": window["compute_s"],
                       "window_s": seconds, "allocator": allocator}
            window.update(loss=0.0, ce=0.0, kd=0.0, micro=0, tokens=0, data_s=0.0, compute_s=0.0,
                          t0=time.perf_counter())
            if rank == 0 and config.get("metrics_file"):
                with open(config["metrics_file"], "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if step % tc.checkpoint_every == 0 or last:
                with tempfile.TemporaryDirectory() as d:
                    if rank == 0:
                        state = {**metrics, "student": config["student"],
                                 "dataset_version": config.get("dataset_version")}
                        checkpoints.save(d, model, state, opt, sched)
                        if config.get("registry") is not None:  # every checkpoint becomes a student version
                            config["registry"].publish(d, state, student.base.fingerprint,
                                                       student.tokenizer_fingerprint)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)
            else:
                ray.train.report(metrics)
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


def run_training(dataset, student: StudentConfig, training: TrainingConfig, storage: str | os.PathLike,
                 name: str, resume_from: Optional[str] = None, dataset_version: Optional[int] = None,
                 metrics_file: Optional[str] = None, same_tokenizer: bool = True, registry=None,
                 test_hooks: Optional[dict] = None) -> TrainResult:
    """Fit the student on `dataset` (a Ray Dataset of DATASET_SCHEMA rows). Each call is a new Ray Train run
    with a unique name under `storage`; `resume_from` continues from an earlier run's checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    env = worker_env(training.allocator)  # before Ray Train starts: a missing tcmalloc is a clear error
    config = {"student": student.model_dump(), "training": training.model_dump(), "resume_from": resume_from,
              "dataset_version": dataset_version, "metrics_file": metrics_file, "same_tokenizer": same_tokenizer,
              "registry": registry, **(test_hooks or {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=training.num_workers, use_gpu=training.use_gpu,
                                               resources_per_worker={"CPU": training.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=str(Path(storage).resolve()),
            failure_config=ray.train.FailureConfig(max_failures=training.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env}),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    ckpt = result.checkpoint.path if result.checkpoint else None
    return TrainResult(ckpt, int((result.metrics or {}).get("step", 0)), dict(result.metrics or {}),
                       time.perf_counter() - t0)
