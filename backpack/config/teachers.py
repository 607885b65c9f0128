"""The teachers of a run: each one's backend, model, replicas and their resources, and the query ledger."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from backpack.config.base import DEFAULT_MODEL, NAME, Section, env_var_name
from backpack.core.resources import bundle, check_custom_resources

# Backends a teacher may name (hf: transformers in the actor; vllm: a vLLM engine in the actor, the `vllm` extra;
# openai: any OpenAI-compatible endpoint). RESERVED_BACKENDS: names kept for later versions, refused clearly.
BUILT_BACKENDS = ("hf", "vllm", "openai")
RESERVED_BACKENDS: tuple[str, ...] = ()


class EndpointConfig(Section):
    """Where an `openai` teacher sends its requests, and how hard it may push the endpoint."""

    base_url: str = Field(description="the endpoint up to /v1, e.g. https://api.openai.com/v1 or http://host:8000/v1")
    api_key_env: Optional[str] = Field(None, description=(
        "name of the environment variable holding the API key (keys never go in the config); null: no key"))
    concurrency: int = Field(4, ge=1, le=512, description="requests in flight at once, per replica")
    requests_per_minute: Optional[float] = Field(None, gt=0, description="the endpoint's request limit (null: none)")
    tokens_per_minute: Optional[float] = Field(None, gt=0, description=(
        "the endpoint's token limit, on an estimate of prompt + most generated tokens (null: none)"))
    max_retries: int = Field(4, ge=0, le=20, description=(
        "tries after the first on 429, 5xx, timeouts and refused connections"))
    backoff_s: float = Field(0.5, gt=0, le=60, description=(
        "first retry delay; it doubles each retry, with jitter, and is at least the server's Retry-After"))
    timeout_s: float = Field(120.0, gt=0, description="seconds for one request")
    scoring: Literal["none", "vllm"] = Field("none", description=(
        "how the endpoint scores a completion it did not write (on-policy distillation): vllm: a vLLM server "
        "(its /tokenize renders the chat, /v1/completions with echo returns the prompt logprobs); none: it "
        "cannot, and on-policy objectives refuse the teacher"))

    @field_validator("base_url")
    @classmethod
    def _url(cls, v):
        if not v.startswith(("http://", "https://")) or len(v.split("://", 1)[1].strip("/")) == 0:
            raise ValueError(f"{v!r} is not an http(s) URL (e.g. https://api.openai.com/v1)")
        if "@" in v.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("holds credentials (user:password@): put the key in the environment variable named by "
                             "endpoint.api_key_env instead, so it is never printed or stored")
        return v

    _env_name = field_validator("api_key_env")(classmethod(lambda cls, v: env_var_name(v)))


class VLLMConfig(Section):
    """Engine settings of a `vllm` teacher (backpack/teachers/vllm.py). Defaults suit a laptop CPU and a GPU node."""

    max_model_len: Optional[int] = Field(None, ge=16, description=(
        "longest prompt + answer in tokens (null: the model's own context); smaller means a smaller KV cache"))
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU: the share of its memory the engine may take")
    enforce_eager: Optional[bool] = Field(None, description=(
        "skip CUDA graphs and compilation (null: on for CPU, where nothing is gained, off on GPUs); on starts faster"))
    max_num_seqs: Optional[int] = Field(None, ge=1, description="sequences decoded at once (null: vLLM's default)")
    max_logprobs: int = Field(20, ge=0, le=1024, description=(
        "top-k logprobs the engine may return per token (vLLM's max_logprobs); raised to decoding.logprobs when "
        "that asks for more"))
    cpu_kv_cache_gib: float = Field(2.0, gt=0, description=(
        "CPU build only: GiB of RAM for the KV cache (vLLM's own default reserves 92% of the node's memory and "
        "refuses to start when other processes use more than 8%)"))
    cpu_threads_bind: Optional[str] = Field(None, description=(
        "CPU build only: the cores its OpenMP threads are pinned to (VLLM_CPU_OMP_THREADS_BIND: `0-3`, `auto`, "
        "...); null: the first `threads` cores the replica may run on. Two vllm replicas on one node need "
        "disjoint ranges"))
    trust_remote_code: bool = Field(False, description=(
        "run the Python code that ships with the model's repository (vLLM's trust_remote_code): only for models "
        "whose code you trust; off, such a model fails to load and says so"))
    engine_args: dict[str, Any] = Field(default_factory=dict, description=(
        "any other vllm.LLM argument, passed as is (trust_remote_code only through its own field)"))

    @field_validator("engine_args")
    @classmethod
    def _no_code_execution(cls, v):
        if "trust_remote_code" in v:
            raise ValueError("trust_remote_code is not taken from engine_args: set teachers[].vllm.trust_remote_code "
                             "(it runs the model repository's own code)")
        return v


class TeacherConfig(Section):
    """One teacher: a model behind a backend, served by `replicas` Ray actors."""

    name: str = Field(pattern=NAME, description="the teacher's name: rows, routing and `teacher` fields use it")
    backend: str = Field("hf", description=f"one of {', '.join(BUILT_BACKENDS)}")
    model: str = Field(DEFAULT_MODEL, description=(
        "`default` (SmolLM2-135M-Instruct), a .gguf file, a local HF directory, or a hub id; backend openai: "
        "the endpoint's model name"))
    replicas: int = Field(1, ge=1, le=64, description="actors serving this teacher")
    batch_size: int = Field(8, ge=1, le=1024, description=(
        "Queries per model batch (the scheduler's batches are this size too); backend hf: also the most Queries "
        "dynamic batching gathers from the calls waiting at a replica into one batch"))
    max_in_flight: int = Field(2, ge=1, le=64, description="batches queued at one replica at a time")
    max_batch_wait_ms: float = Field(10.0, ge=0, le=10_000, description=(
        "backend hf: calls waiting at a replica are gathered into one model batch (up to batch_size Queries) for "
        "at most this long after the first found the model idle; callers that queued while it was busy wait no "
        "more. 0: off (each call is its own batch, one call at a time)"))
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves for each replica")
    resources: dict[str, float] = Field(default_factory=dict, description=(
        "custom Ray resources each replica needs, e.g. `{teacher: 1}` on a cluster whose teacher nodes offer it"))
    placement: Literal["any", "pack", "spread", "strict_pack", "strict_spread"] = Field("any", description=(
        "`any`: Ray places each replica where it fits; pack / spread / strict_pack / strict_spread reserve all "
        "replicas at once in a placement group with that strategy (strict_spread: one replica per node)"))
    threads: int = Field(1, ge=1, le=256, description="torch threads per replica")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: CUDA when torch sees a GPU")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights and compute type")
    prepack_weights: bool = Field(True, description=(
        "backend hf, on CPU in float32: reorder the linear layers' weights once for oneDNN's matmul "
        "(backpack/teachers/packed.py; same answers up to float rounding); false: PyTorch's own matmul"))
    endpoint: Optional[EndpointConfig] = Field(None, description="backend openai: the endpoint (required there)")
    vllm: Optional[VLLMConfig] = Field(None, description="backend vllm: engine settings (absent: their defaults)")
    cost_per_1k_tokens: float = Field(0.0, ge=0, description=(
        "what a thousand tokens (prompt + completion) of this teacher cost: the spend in status and report, and "
        "the order of scheduler.policy cheapest"))
    tags: list[str] = Field(default_factory=list, description="tasks it is for (scheduler.policy by_task); []: any")

    @model_validator(mode="before")
    @classmethod
    def _engine_defaults(cls, data):
        """A vllm teacher always has its engine settings: the defaults when the config gives none."""
        if isinstance(data, dict) and data.get("backend") == "vllm" and data.get("vllm") is None:
            return {**data, "vllm": {}}
        return data

    @field_validator("backend")
    @classmethod
    def _backend(cls, v):
        if v in RESERVED_BACKENDS:
            raise ValueError(f"backend {v!r} is not available in this version of Backpack (available: "
                             f"{', '.join(BUILT_BACKENDS)})")
        if v not in BUILT_BACKENDS:
            raise ValueError(f"unknown backend {v!r} (choose from {', '.join(BUILT_BACKENDS + RESERVED_BACKENDS)})")
        return v

    _resources = field_validator("resources")(classmethod(lambda cls, v: check_custom_resources(v)))

    @model_validator(mode="after")
    def _sections_match_backend(self):
        if self.backend == "openai" and self.endpoint is None:
            raise ValueError("backend 'openai' needs an endpoint: {base_url: ..., api_key_env: ...}")
        if self.backend != "openai" and self.endpoint is not None:
            raise ValueError(f"endpoint is for backend 'openai' (this teacher's backend is {self.backend!r})")
        if self.backend != "vllm" and self.vllm is not None:
            raise ValueError(f"vllm: is for backend 'vllm' (this teacher's backend is {self.backend!r})")
        if self.device == "cuda" and self.num_gpus <= 0:
            raise ValueError("device 'cuda' needs num_gpus > 0 so Ray places the replica on a GPU")
        if self.placement != "any" and not (self.num_cpus or self.num_gpus or any(self.resources.values())):
            raise ValueError(f"placement {self.placement!r} reserves each replica's resources in a placement "
                             "group: give the replicas num_cpus, num_gpus or resources")
        return self

    def bundle(self) -> dict[str, float]:
        """What one replica reserves: its CPUs, GPUs and custom resources (zeros left out)."""
        return bundle(self.num_cpus, self.num_gpus, self.resources)

    def dynamic_batching(self) -> bool:
        """Whether a replica gathers concurrent calls into shared model batches (backpack/teachers/batching.py)."""
        return self.backend == "hf" and self.max_batch_wait_ms > 0


class LedgerConfig(Section):
    """The query ledger (backpack/teachers/ledger.py): answers stored in Redis by teacher, prompt and decoding, so an
    answer is paid for once, across runs that share a Redis server."""

    use: Literal["auto", "always", "never"] = Field("auto", description=(
        "auto: for teachers that cost per answer (backend openai); always: for every teacher; never: off"))
    lease_s: float = Field(10.0, ge=1, le=3600, description=(
        "seconds a replica's claim on a prompt it is answering lasts without renewal (it renews while working): "
        "how long others wait before taking over the prompts of a replica that died"))
    max_wait_s: Optional[float] = Field(None, gt=0, le=86400, description=(
        "seconds a replica waits for a prompt another replica has claimed before answering it itself, paying "
        "twice rather than waiting on an owner that renews its claim but never answers (null: 5 x lease_s)"))
    keep_days: Optional[float] = Field(None, gt=0, description="days an answer is kept (null: until Redis evicts it)")

    def applies(self, backend: str) -> bool:
        return self.use == "always" or (self.use == "auto" and backend == "openai")
