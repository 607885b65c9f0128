"""The student versions a StudentServer holds: each loaded as its own model (LoRA merged when serve.merge), or,
with serve.merge false, LoRA versions as adapters of one shared base, the request's made active as it
generates."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from backpack.config import ServeConfig, StudentConfig
from backpack.student.registry import Registry, load_version
from backpack.teachers.hf import HFTeacher


@dataclass(frozen=True)
class Served:
    version: int
    gen: HFTeacher  # the version's model and tokenizer, with its stop tokens and context length
    adapter: Optional[str] = None  # its adapter in a base shared with other versions (serve.merge false)

    def activate(self) -> None:
        """Make this version's adapter the active one of the shared base (under the generation lock)."""
        if self.adapter is not None:
            self.gen.model.set_adapter(self.adapter)


class VersionLoader:
    def __init__(self, student_cfg: StudentConfig, serve_cfg: ServeConfig, registry: Optional[Registry],
                 model_name: str):
        self.student_cfg, self.serve_cfg, self.registry, self.model_name = student_cfg, serve_cfg, registry, model_name
        self._bases: dict[str, HFTeacher] = {}  # serve.merge false: one model per base, its versions as adapters

    def load(self, version: int) -> Served:
        """Version `version` (0: the untrained base), loaded; ValueError or KeyError when it cannot be."""
        if version != 0 and self.registry is None:
            raise ValueError(f"cannot serve student version {version}: the server has no registry")
        meta = self.registry.get(version) if version else None
        name = f"{self.model_name}-v{version}"
        shared = self._shared_adapter(meta, version)
        if shared is not None:
            return shared
        ap = load_version(meta, self.student_cfg, merge=self.serve_cfg.merge)
        return Served(version, HFTeacher.from_model(name, ap.model, ap.tokenizer, fingerprint=name))

    def _shared_adapter(self, meta: Optional[dict], version: int) -> Optional[Served]:
        """With serve.merge false, a LoRA version (lora, dora, rslora) is one more adapter of the model that holds
        its base: many task adapters, one base in memory, the request's adapter made active as it generates."""
        from backpack.config import StudentConfig
        from backpack.data.storage import local_folder
        from backpack.student import checkpoints
        from backpack.student.autopilot import lora_config

        student = StudentConfig(**meta["student"]) if meta and meta.get("student") else None
        if self.serve_cfg.merge or student is None or student.mode != "lora" or student.adapter == "pissa":
            return None  # pissa changes the base itself: it cannot be shared
        key = json.dumps(student.model_dump(include={"base", "layers", "target_modules"}), sort_keys=True)
        host = self._bases.get(key)
        if host is None:  # the base with an untrained adapter, which no request uses
            ap = load_version(None, student, merge=False)
            host = self._bases[key] = HFTeacher.from_model(f"{self.model_name}-base", ap.model, ap.tokenizer,
                                                           fingerprint=key)
        name = f"v{version}"
        if name not in host.model.peft_config:
            host.model.add_adapter(name, lora_config(student))
            checkpoints.load_weights(local_folder(meta["path"]), host.model, adapter=name)
            host.model.eval()
        return Served(version, host, adapter=name)
