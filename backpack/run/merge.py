"""`backpack merge CONFIG SOURCE SOURCE ... [--method M] [--weights W,W] [--density D]`: student versions trained
on different tasks (LoRA adapters on one base) combined into one adapter with peft's merges, published as a new
version of CONFIG's run, so it is evaluated, served, exported and promoted like any other.

A SOURCE is `N` (version N of CONFIG's run) or `OTHER_CONFIG:N` (version N of another run). Every source must be
a plain LoRA adapter (student.adapter lora) on the same base and target modules as CONFIG's student. Methods
(peft's `add_weighted_adapter`): `cat` (the default: the adapters side by side, exact, rank = the sum), `svd`
(exact sum, truncated to the largest rank), `linear` (A and B averaged: rough), `ties`, `dare_linear`,
`dare_ties` (`--density`: the share of weights kept, 0.5 by default). The merged version's metadata names its
sources, method, weights and density (its lineage); its student config carries the merged rank.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from backpack.config import RunConfig, load_config
from backpack.data.storage import run_files
from backpack.errors import InputError
from backpack.runtime.progress import Reporter
from backpack.runtime.session import attach_redis

METHODS = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties")
_SAME = ("base", "mode", "adapter", "target_modules", "layers")


@dataclass
class MergeResult:
    version: int
    sources: list[str]
    method: str
    rank: int

    def line(self, run: str) -> str:
        return (f"merged {', '.join(self.sources)} ({self.method}) into version {self.version} of run {run!r} "
                f"(LoRA rank {self.rank}); evaluate it with backpack eval CONFIG --version {self.version}")


def _sources(cfg: RunConfig, specs: list[str]) -> list[tuple[str, dict]]:
    """(label, version metadata) per SOURCE, checked against CONFIG's student."""
    from backpack.student.registry import Registry

    out = []
    for spec in specs:
        path, _, number = spec.rpartition(":")
        if not number.isdigit() or int(number) == 0:
            raise InputError(f"merge source {spec!r}: a version number >= 1, or OTHER_CONFIG:N")
        run_cfg = load_config(path) if path else cfg
        with attach_redis(run_cfg) as url:
            try:
                meta = Registry(url, run_cfg.name, run_files(run_cfg)).get(int(number))
            except KeyError:
                raise InputError(f"merge source {spec!r}: run {run_cfg.name!r} has no student version {number}") \
                    from None
        student = meta.get("student") or {}
        mine = cfg.student.model_dump()
        differs = [k for k in _SAME if student.get(k) != mine.get(k)]
        if student.get("mode") != "lora" or student.get("adapter", "lora") != "lora":
            raise InputError(f"merge source {spec!r} is not a plain LoRA adapter (student.mode "
                             f"{student.get('mode')!r}, adapter {student.get('adapter', 'lora')!r}): only LoRA "
                             "versions merge")
        if differs:
            raise InputError(f"merge source {spec!r} differs from run {cfg.name!r}'s student in "
                             f"{', '.join(differs)}: adapters merge only on the same base and modules")
        out.append((f"{run_cfg.name}:v{number}", meta))
    return out


def parse_weights(text: Optional[str]) -> Optional[list[float]]:
    """`--weights 0.7,0.3`: one finite number per source."""
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise InputError(f"--weights {text!r}: comma-separated numbers, one per source") from None
    if not all(math.isfinite(w) for w in weights):
        raise InputError(f"--weights {text!r}: the weights must be finite numbers")
    return weights


def merge(cfg: RunConfig, specs: list[str], method: str = "cat", weights: Optional[str | list[float]] = None,
          density: Optional[float] = None, reporter: Optional[Reporter] = None) -> MergeResult:
    """Merge the SOURCE versions into a new version of CONFIG's run (see the module docstring). `weights`: one
    per source (or their `--weights` text); default equal."""
    from safetensors.torch import save_file

    from backpack.config import StudentConfig
    from backpack.data.storage import local_folder
    from backpack.student import checkpoints
    from backpack.student.autopilot import load_student
    from backpack.student.registry import Registry

    cfg.require("student")
    rep = reporter or Reporter()
    if cfg.student.mode != "lora" or cfg.student.adapter != "lora":
        raise InputError(f"run {cfg.name!r}'s student is not a plain LoRA adapter: merges need student.mode lora "
                         "and student.adapter lora")
    if len(specs) < 2:
        raise InputError("merge needs at least two sources")
    if method not in METHODS:
        raise InputError(f"--method {method!r}: one of {', '.join(METHODS)}")
    weights = (parse_weights(weights) if isinstance(weights, str) else weights) or [1.0 / len(specs)] * len(specs)
    if len(weights) != len(specs):
        raise InputError(f"--weights has {len(weights)} value(s) for {len(specs)} source(s)")
    if method.startswith(("ties", "dare")):
        density = 0.5 if density is None else density
        if not 0 < density <= 1:
            raise InputError(f"--density {density}: a share of the weights kept, in (0, 1]")
    elif density is not None:
        raise InputError(f"--density applies to ties and dare merges, not {method}")
    sources = _sources(cfg, specs)
    rep.stage(f"merging {len(sources)} adapter(s) on {cfg.student.base} ({method})")
    ap = load_student(cfg.student)
    model, names = ap.model, []
    for i, (label, meta) in enumerate(sources):
        name = f"source{i}"
        model.add_adapter(name, model.peft_config["default"])
        try:
            checkpoints.load_weights(local_folder(meta["path"]), model, adapter=name)
        except ValueError as e:
            raise InputError(f"merge source {label}: {e}") from None
        names.append(name)
    kw = {"density": density} if density is not None else {}
    model.add_weighted_adapter(names, weights, "merged", combination_type=method, **kw)
    merged_cfg = model.peft_config["merged"]
    state = {k.replace(".merged.", ".default."): v.detach().clone() for k, v in model.state_dict().items()
             if ".merged." in k}
    student = StudentConfig(**{**cfg.student.model_dump(), "lora_r": merged_cfg.r,
                               "lora_alpha": float(merged_cfg.lora_alpha)})
    lineage = {"merged_from": [label for label, _ in sources], "method": method, "weights": weights,
               "density": density}
    info = {"step": None, "student": student.model_dump(), "lineage": lineage}
    with tempfile.TemporaryDirectory() as d, attach_redis(cfg) as url:
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(d) / checkpoints.WEIGHTS))
        (Path(d) / checkpoints.STATE).write_text(json.dumps(info))
        version = Registry(url, cfg.name, run_files(cfg)).publish(d, info, ap.base.fingerprint,
                                                                  ap.tokenizer_fingerprint)
    return MergeResult(version, lineage["merged_from"], method, merged_cfg.r)
