"""RunConfig: one run's whole config, the sections of every role together, with the checks across sections and
where the run's files live."""

from __future__ import annotations

from hashlib import sha256
from pathlib import Path
from typing import Optional

from pydantic import Field, model_validator

from backpack.config.base import NAME, Section
from backpack.config.cluster import RayConfig, RedisConfig
from backpack.config.evaluation import EvalConfig
from backpack.config.mental import MentalConfig
from backpack.config.prompts import DecodingConfig, PromptsConfig
from backpack.config.scheduling import SchedulerConfig
from backpack.config.serve import ServeConfig
from backpack.config.storage import StorageConfig, join_uri
from backpack.config.student import ContinualConfig, StudentConfig, TrainingConfig
from backpack.config.synthesis import SynthesisConfig
from backpack.config.teachers import LedgerConfig, TeacherConfig, VLLMConfig
from backpack.errors import ConfigError

# prompts.path naming the run's latest synthesized prompt set (backpack/run/synthesize.py) instead of a file
SYNTHESIZED = "synthesized"


class RunConfig(Section):
    """One run: a YAML file, validated once. A section the file leaves out has its defaults; `student` and
    `training` are required by the commands that train (`given` says whether the file wrote a section)."""

    name: str = Field(pattern=NAME, description="the run's name: its folder `<storage.path>/<name>`, its Redis keys")
    ray: RayConfig = Field(default_factory=RayConfig, description="the Ray cluster")
    redis: RedisConfig = Field(default_factory=RedisConfig, description="the Redis server")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="where the run's files live")
    teachers: list[TeacherConfig] = Field(min_length=1, description="the teachers, in config order")
    prompts: PromptsConfig = Field(description="the prompt collection")
    decoding: DecodingConfig = Field(default_factory=DecodingConfig, description="how teachers decode")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="routing and batching")
    ledger: LedgerConfig = Field(default_factory=LedgerConfig, description="the query ledger")
    student: StudentConfig = Field(default_factory=StudentConfig, description=(
        "the student (required by `backpack train` and `run`)"))
    training: TrainingConfig = Field(default_factory=TrainingConfig, description=(
        "how the student is trained (required by `backpack train` and `run`)"))
    eval: EvalConfig = Field(default_factory=EvalConfig, description="how student versions are scored")
    continual: ContinualConfig = Field(default_factory=ContinualConfig, description="`backpack run --continual`")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="the StudentServer of a continual run")
    mental: Optional[MentalConfig] = Field(None, description=(
        "task knowledge recalled for the teachers (absent: no recall)"))
    synthesis: Optional[SynthesisConfig] = Field(None, description=(
        "the teachers write new prompts (`backpack synthesize`; absent: the prompts are all given)"))

    @model_validator(mode="before")
    @classmethod
    def _engines_return_the_logprobs_asked(cls, data):
        """A vLLM engine returns at most max_logprobs per token: raised to decoding.logprobs where that asks for
        more (a new input: nothing given is changed in place)."""
        if not isinstance(data, dict) or not isinstance(data.get("teachers"), list):
            return data
        decoding = data.get("decoding")
        asked = decoding.logprobs if isinstance(decoding, DecodingConfig) else \
            decoding.get("logprobs", 0) if isinstance(decoding, dict) else 0
        if isinstance(asked, bool) or not isinstance(asked, int) or asked <= 0:
            return data
        return {**data, "teachers": [_with_max_logprobs(t, asked) for t in data["teachers"]]}

    @model_validator(mode="after")
    def _unique_teachers(self):
        names = [t.name for t in self.teachers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"teacher names must be unique (repeated: {', '.join(dup)})")
        return self

    @model_validator(mode="after")
    def _ensemble_fits_teachers(self):
        sc, names = self.scheduler, [t.name for t in self.teachers]
        if sc.policy != "ensemble":
            if sc.ensemble is not None:
                raise ValueError(f"scheduler.ensemble is set but scheduler.policy is {sc.policy!r}: set "
                                 "scheduler.policy to ensemble, or remove scheduler.ensemble")
            return self
        e = sc.ensemble_settings()
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

    @model_validator(mode="after")
    def _synthesis_fits_teachers(self):
        names = [t.name for t in self.teachers]
        if self.prompts.path == SYNTHESIZED and self.synthesis is None:
            raise ValueError(f"prompts.path is {SYNTHESIZED!r} (the run's synthesized prompts) but the config has "
                             "no synthesis: section")
        if self.synthesis is not None and self.synthesis.teacher not in (None, *names):
            raise ValueError(f"synthesis.teacher names unknown teacher {self.synthesis.teacher!r} (the run's "
                             f"teachers: {', '.join(names)})")
        syn = self.synthesis
        if syn is not None and syn.judge not in (None, *names):
            raise ValueError(f"synthesis.judge names unknown teacher {syn.judge!r} (the run's teachers: "
                             f"{', '.join(names)})")
        if syn is not None and syn.source == "pack" and not syn.pack and not (self.mental and self.mental.path):
            raise ValueError("synthesis.source is pack but neither synthesis.pack nor mental.path names a "
                             "knowledge pack")
        return self

    @model_validator(mode="after")
    def _teachers_can_score(self):
        """On-policy training has the teachers score the student's samples: a teacher that cannot (an endpoint
        that returns no prompt logprobs) is refused here, not at its first step."""
        if self.training.objective == "off_policy":
            return self
        cannot = [t.name for t in self.teachers
                  if t.backend == "openai" and (t.endpoint is None or t.endpoint.scoring == "none")]
        if cannot:
            raise ValueError(f"training.objective {self.training.objective} has the teachers score the student's "
                             f"samples, but teacher(s) {', '.join(cannot)} (backend openai) cannot: only a vLLM "
                             "server returns the logprobs of a given text (set their endpoint.scoring: vllm if "
                             "they are one), or use off_policy")
        return self

    # ------------------------------------------------------------------ sections

    def given(self, section: str) -> bool:
        """Whether the config file (or an override) wrote `section`, rather than leaving it to its defaults."""
        return section in self.model_fields_set

    def require(self, *sections: str) -> None:
        """ConfigError naming each section a command needs that the config does not write."""
        missing = [s for s in sections if not self.given(s)]
        if missing:
            raise ConfigError(self.name, [f"{s}: required for this command (add a '{s}:' section)" for s in missing])

    def mental_settings(self) -> MentalConfig:
        """The mental section, or its defaults where the run recalls nothing (commands that manage a run's
        knowledge work either way)."""
        return self.mental or MentalConfig()

    @property
    def grounded_only(self) -> bool:
        """Whether training keeps only the answers grounded in their recalled context (mental.train_on)."""
        return self.mental is not None and self.mental.train_on == "grounded"

    # ------------------------------------------------------------------ where the run's files are

    @property
    def run_dir(self) -> Path:
        """The run's folder on this machine (absolute: actors and Ray Train workers do not share the driver's
        working directory). With a local storage.path it holds every file of the run; with a URI only the lock,
        the embedded Redis and caches (under storage.local_path), the rest being under `files_root`."""
        if self.storage.remote:
            local = self.storage.local_path or Path.home() / ".cache" / "backpack" / "work"
            key = sha256(self.storage.path.encode()).hexdigest()[:12]
            return Path(local).expanduser().absolute() / f"{self.name}-{key}"
        if self.storage.path.startswith("file://"):
            return Path(self.storage.path[len("file://"):]).expanduser().absolute() / self.name
        return Path(self.storage.path).expanduser().absolute() / self.name

    @property
    def files_root(self) -> str:
        """Where the run's durable files are: `run_dir` for a local storage.path, else <storage.path>/<name>
        (open them with `backpack.data.storage.run_files`)."""
        return join_uri(self.storage.path, self.name) if self.storage.remote else str(self.run_dir)

    @property
    def dataset_dir(self) -> Path | str:
        """The DatasetStore's root: a local folder, or a URI when storage.path is one."""
        return join_uri(self.files_root, "dataset") if self.storage.remote else self.run_dir / "dataset"


def _with_max_logprobs(teacher, asked: int):
    """A teacher's input with its vLLM engine's max_logprobs at least `asked` (other teachers as they are)."""
    if isinstance(teacher, TeacherConfig):
        v = teacher.vllm
        if v is None or v.max_logprobs >= asked:
            return teacher
        return teacher.model_copy(update={"vllm": v.model_copy(update={"max_logprobs": asked})})
    if not isinstance(teacher, dict) or teacher.get("backend") != "vllm":
        return teacher
    v = teacher.get("vllm") if teacher.get("vllm") is not None else {}
    if isinstance(v, VLLMConfig):
        return teacher if v.max_logprobs >= asked else {**teacher, "vllm": v.model_copy(update={"max_logprobs": asked})}
    if not isinstance(v, dict):
        return teacher  # not a mapping: validation says so
    current = v.get("max_logprobs", VLLMConfig.model_fields["max_logprobs"].default)
    if isinstance(current, int) and not isinstance(current, bool) and current < asked:
        return {**teacher, "vllm": {**v, "max_logprobs": asked}}
    return teacher
