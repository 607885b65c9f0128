"""Typed run config: one YAML file, validated once, before any actor starts or any model loads.

One module per role, each a few sections (pydantic models whose fields carry their defaults and descriptions:
the docs' config reference is generated from them), `run.py` putting them together, `loader.py` reading a file:

    cluster.py     ray:, redis:              where the run runs and keeps its state
    storage.py     storage:                  where its files live (and the pure arithmetic of locations)
    teachers.py    teachers[]:, ledger:      the teachers, their backends and resources; the query ledger
    prompts.py     prompts:, decoding:       what is asked, and how it is decoded
    scheduling.py  scheduler:                routing, retries, shards, ensembles
    student.py     student:, training:, continual:
    evaluation.py  eval:
    serve.py       serve:
    mental.py      mental:                   the Mental Process
    synthesis.py   synthesis:                the teachers writing new prompts, and their curation
    knowledge.py   knowledge packs           the other file a user writes (tasks, passages, experiences)
"""

from backpack.config.base import DEFAULT_MODEL, Section, looks_like_path
from backpack.config.cluster import RayConfig, RedisConfig
from backpack.config.evaluation import EvalConfig
from backpack.config.loader import apply_overrides, load_config, validate_config
from backpack.config.mental import MentalConfig
from backpack.config.prompts import DecodingConfig, PromptsConfig
from backpack.config.run import SYNTHESIZED, RunConfig
from backpack.config.scheduling import EnsembleConfig, SchedulerConfig
from backpack.config.serve import ServeConfig
from backpack.config.storage import StorageConfig
from backpack.config.student import ContinualConfig, OnPolicyConfig, StudentConfig, TrainingConfig
from backpack.config.synthesis import SynthesisConfig, SynthesisFilters
from backpack.config.teachers import BUILT_BACKENDS, EndpointConfig, LedgerConfig, TeacherConfig, VLLMConfig

__all__ = ["BUILT_BACKENDS", "DEFAULT_MODEL", "ContinualConfig", "DecodingConfig", "EndpointConfig", "EnsembleConfig",
           "EvalConfig", "LedgerConfig", "MentalConfig", "OnPolicyConfig", "PromptsConfig", "RayConfig", "RedisConfig",
           "RunConfig", "SYNTHESIZED", "SchedulerConfig", "Section", "ServeConfig", "StorageConfig", "StudentConfig",
           "SynthesisConfig", "SynthesisFilters", "TeacherConfig",
           "TrainingConfig", "VLLMConfig", "apply_overrides", "load_config", "looks_like_path", "validate_config"]
