"""The student of a run: its base and adapters, how Ray Train trains it, and how it trains continually."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import ConfigDict, Field, field_validator, model_validator

from backpack.config.base import DEFAULT_MODEL, Section
from backpack.core.resources import Group, bundle, check_custom_resources


class StudentConfig(Section):
    """The student: a pretrained base (same loader as the hf teacher) with LoRA adapters, or trained in full."""

    base: str = Field(DEFAULT_MODEL, description="`default`, a .gguf file, a local HF directory, or a hub id")
    mode: Literal["lora", "full"] = Field("lora", description="lora: adapters on the frozen base; full: every weight")
    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA scaling (alpha / r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA path")
    adapter: Literal["lora", "dora", "rslora", "pissa"] = Field("lora", description=(
        "the LoRA variant peft builds: lora; dora (weight-decomposed: a learned magnitude per output); rslora "
        "(rank-stabilised scaling alpha / sqrt(r)); pissa (initialised from the base's principal singular "
        "vectors, the residual left in the frozen base)"))
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      min_length=1, description="linear modules that get adapters, by name")
    layers: Optional[Literal["every_other"] | list[int]] = Field(None, description=(
        "make the student smaller than its base: `every_other` keeps layers 0, 2, 4, ...; a list keeps those "
        "indices (trained in full)"))

    @model_validator(mode="after")
    def _subset_trains_in_full(self):
        if self.layers is not None and self.mode == "lora":
            raise ValueError("a student with a subset of its base's layers is trained in full: set mode: full")
        return self

    @model_validator(mode="after")
    def _adapter_needs_lora(self):
        if self.adapter != "lora" and self.mode != "lora":
            raise ValueError(f"student.adapter {self.adapter!r} is a LoRA variant: it needs mode: lora")
        return self


class OnPolicyConfig(Section):
    """On-policy distillation (training.objective on_policy or mixed): the student samples answers to the run's
    prompts, the teachers score every token of them, and the student learns from its own samples."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    lambda_: float = Field(0.5, alias="lambda", ge=0, le=1, description=(
        "objective mixed: the share of optimizer steps trained on the student's own scored samples (GKD's "
        "lambda); the others train on the teachers' stored answers"))
    loss: Literal["forward_kl", "reverse_kl", "jsd", "sampled"] = Field("forward_kl", description=(
        "forward_kl: KL(teacher || student) on the teacher's top-k at each sampled position (training.top_k, "
        "with the tail bucket; mass-covering: keeps a weak student from collapsing onto short answers); "
        "reverse_kl: KL(student || teacher) there; jsd: GKD's generalised Jensen-Shannon (training.beta); "
        "sampled: the teacher's minus the student's logprob of each sampled token as its reward (needs no top-k)"))
    max_new_tokens: int = Field(64, ge=1, le=4096, description="longest answer the student samples")
    temperature: float = Field(1.0, gt=0, le=5, description="the student's sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="the student's nucleus sampling (1: off)")


class TrainingConfig(Section):
    """How the student is trained on the run's dataset with Ray Train."""

    num_workers: int = Field(1, ge=1, le=512, description="data-parallel workers (DDP)")
    cpus_per_worker: float = Field(1.0, gt=0, description="fractional is fine: leave CPUs for Ray Data")
    use_gpu: bool = Field(False, description="one GPU per worker")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description=(
        "custom Ray resources each worker needs, e.g. `{trainer: 1}` on a cluster whose trainer nodes offer it"))
    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] = Field("pack", description=(
        "how Ray Train places the workers: pack (few nodes), spread, strict_pack (one node), strict_spread"))
    threads_per_worker: int = Field(1, ge=1, le=256, description="torch threads per worker")
    batch_size: int = Field(8, ge=1, description="rows per micro-batch per worker")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_steps: int = Field(100, ge=1, description="optimizer steps in all (ignored in continual mode)")
    lr: float = Field(2e-4, gt=0, le=1, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="steps of linear warmup")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="learning-rate decay after warmup")
    max_len: int = Field(512, ge=8, description="longer sequences are truncated (and counted)")
    kd_weight: float = Field(0.0, ge=0, le=1, description=(
        "0: sequence-level KD (SFT on the teacher's text); 1: token-level KD on its top-k logprobs only"))
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field("forward_kl", description="token-level KD's divergence")
    beta: float = Field(0.5, gt=0, lt=1, description="JSD weight")
    top_k: int = Field(4, ge=1, le=64, description="teacher logprobs used per token (<= decoding.logprobs)")
    on_tokenizer_mismatch: Literal["error", "sequence_level"] = Field("error", description=(
        "token-level KD needs teacher and student to share a tokenizer: `error` refuses a mismatched run, "
        "`sequence_level` falls back to SFT on the teacher's text"))
    objective: Literal["off_policy", "on_policy", "mixed"] = Field("off_policy", description=(
        "off_policy: learn the teachers' stored answers; on_policy: the student writes, the teachers score "
        "(the teachers run beside the trainer); mixed: on_policy.lambda of the steps on-policy, the rest off"))
    on_policy: OnPolicyConfig = Field(default_factory=OnPolicyConfig, description="on-policy sampling and loss")
    log_every: int = Field(5, ge=1, description="steps between metrics lines")
    checkpoint_every: int = Field(20, ge=1, description="steps between checkpoints (each becomes a student version)")
    max_failures: int = Field(1, ge=0, description="worker-group restarts from the last checkpoint")
    seed: int = Field(0, description="seeds the model's initialisation and the data order")
    allocator: Literal["auto", "tcmalloc", "system"] = Field("auto", description=(
        "memory allocator of the training workers: `auto`: glibc's malloc set to keep the memory it took (no "
        "package needed; the fastest measured, benchmarks/allocator.py); `tcmalloc`: preload tcmalloc (the "
        "system's package, required); `system`: glibc's malloc as it is, one arena"))

    _resources = field_validator("resources_per_worker")(classmethod(lambda cls, v: check_custom_resources(v)))

    def workers_group(self) -> Group:
        """What the Ray Train workers need of the cluster: one bundle per worker, placed by `placement` (Ray Train
        reserves them as one placement group)."""
        need = bundle(self.cpus_per_worker, 1.0 if self.use_gpu else 0.0, self.resources_per_worker)
        return Group("training workers", (need,) * self.num_workers, self.placement)


class ContinualConfig(Section):
    """The continual loop: the trainer keeps training on new shards, each version is gated before it is served."""

    replay_ratio: float = Field(0.25, ge=0, lt=1, description="share of each batch drawn from older data")
    poll_seconds: float = Field(2.0, gt=0, le=600, description="how often the trainer looks for new shards")
    publish_every_steps: int = Field(20, ge=1, description="a new student version every K optimizer steps ...")
    publish_every_seconds: float = Field(300.0, gt=0, description="... or every T seconds of training, first wins")
    promote_metric: Literal["nll", "kl", "chrf"] = Field("nll", description=(
        "what the promotion gate compares on held-out rows (nll and kl: lower is better; chrf: higher)"))
    promote_margin: float = Field(0.0, ge=0, description=(
        "a new version is served unless it is worse than the live one by more than this"))
    gate_rows: int = Field(16, ge=1, description="held-out rows each gate decision is measured on")
