"""Where a run runs: the Ray cluster it starts or joins, and the Redis server that holds its state."""

from __future__ import annotations

import re
from typing import Optional

from pydantic import Field, field_validator

from backpack.config.base import Section, env_var_name


class RayConfig(Section):
    """The Ray cluster of a run."""

    address: Optional[str] = Field(None, description=(
        "null: start a local cluster for the run; else the cluster to join: `auto`, `host:6379`, "
        "`ray://host:10001` (inside a Ray Job, `RAY_ADDRESS` is used when this is null)"))
    dashboard: bool = Field(False, description="start Ray's dashboard with a local cluster")
    num_cpus: Optional[float] = Field(None, gt=0, description="logical CPUs of a local cluster (null: all cores)")
    namespace: Optional[str] = Field(None, description="Ray namespace of the run's actors (null: `backpack`)")


class RedisConfig(Section):
    """The Redis server that holds a run's queues, streams, ledger and state."""

    url: Optional[str] = Field(None, description=(
        "null: start an embedded Redis for the run (loopback, a generated password); else "
        "`redis://[:password@]host:port/db` (`rediss://`, `unix://` too)"))
    password_env: Optional[str] = Field(None, description=(
        "name of the environment variable holding the server's password (never the password itself)"))

    _env_name = field_validator("password_env")(classmethod(lambda cls, v: env_var_name(v)))

    @field_validator("url")
    @classmethod
    def _scheme(cls, v):
        if v is not None and not re.match(r"^(redis|rediss|unix)://", v):
            raise ValueError(f"must start with redis://, rediss:// or unix:// (got {v!r})")
        return v
