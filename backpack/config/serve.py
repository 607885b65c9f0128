"""How the StudentServer serves student versions (`backpack serve`, and a continual run's live version)."""

from __future__ import annotations

import ipaddress
from typing import Optional

from pydantic import Field, field_validator, model_validator

from backpack.config.base import Section
from backpack.core.resources import bundle, check_custom_resources


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServeConfig(Section):
    """The StudentServer (`backpack serve`, and a continual run's server): an OpenAI-compatible HTTP endpoint
    serving student versions."""

    host: str = Field("127.0.0.1", description=(
        "0.0.0.0 to accept connections from other machines (then api_key_env is required)"))
    port: int = Field(8000, ge=0, le=65535, description="0: any free port (printed at start)")
    max_new_tokens: int = Field(128, ge=1, le=32_768, description="default and upper bound of a request's max_tokens")
    threads: int = Field(1, ge=1, le=256, description="torch threads of the server")
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for the server actor")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources of the server actor")
    merge: bool = Field(True, description="serve LoRA versions merged into the base (faster)")
    api_key_env: Optional[str] = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description=(
        "name of an environment variable holding the API key clients send as 'Authorization: Bearer <key>' "
        "(required unless host is loopback; the key itself never goes in a config)"))
    max_batch: int = Field(16, ge=1, le=1024, description=(
        "requests decoded together: one joins the running batch at the next step and leaves it when it ends "
        "(1: one request at a time)"))
    max_queue: int = Field(32, ge=1, le=100_000, description=(
        "requests waiting or generating at once; more are answered 429 with Retry-After"))
    request_timeout_s: float = Field(120.0, gt=0, le=86_400, description=(
        "a request not finished within this many seconds is stopped (504, or 503 while still queued)"))
    max_versions: int = Field(2, ge=1, le=64, description=(
        "versions kept loaded besides the default for requests whose model names one (<run>:v<N>)"))

    _resources = field_validator("resources")(classmethod(lambda cls, v: check_custom_resources(v)))

    @model_validator(mode="after")
    def _key_off_loopback(self):
        if not is_loopback(self.host) and not self.api_key_env:
            raise ValueError(f"serve.host {self.host!r} accepts connections from other machines: set "
                             "serve.api_key_env to the name of an environment variable holding an API key")
        return self

    def bundle(self) -> dict[str, float]:
        """What the server actor reserves (zeros left out)."""
        return bundle(self.num_cpus, 0.0, self.resources)
