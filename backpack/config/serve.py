"""How a continual run serves its live student version."""

from __future__ import annotations

from pydantic import Field, field_validator

from backpack.config.base import Section
from backpack.core.resources import bundle, check_custom_resources


class ServeConfig(Section):
    """The StudentServer: an OpenAI-compatible HTTP endpoint serving the live student version."""

    host: str = Field("127.0.0.1", description="0.0.0.0 to accept connections from other machines")
    port: int = Field(8000, ge=0, le=65535, description="0: any free port (printed at start)")
    max_new_tokens: int = Field(128, ge=1, le=32_768, description="default and upper bound of a request's max_tokens")
    threads: int = Field(1, ge=1, le=256, description="torch threads of the server")
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for the server actor")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources of the server actor")
    merge: bool = Field(True, description="serve LoRA versions merged into the base (faster)")

    _resources = field_validator("resources")(classmethod(lambda cls, v: check_custom_resources(v)))

    def bundle(self) -> dict[str, float]:
        """What the server actor reserves (zeros left out)."""
        return bundle(self.num_cpus, 0.0, self.resources)
