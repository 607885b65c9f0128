"""Connecting to Ray and checking that the cluster can place a run before anything is spawned."""

from __future__ import annotations

import logging
import os
import socket

from backpack.config import RayConfig
from backpack.core.resources import Demand, Group, multi_node_problems, placement_problems
from backpack.errors import BackpackError, ResourceError

DEFAULT_NAMESPACE = "backpack"


def _host_port(address: str) -> tuple[str, int] | None:
    """host and port of "host:port" or "ray://host:port" ("auto" and other forms: None)."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on an address nothing listens at: ray.init would retry for minutes before giving up."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        socket.create_connection(hp, timeout=timeout).close()
    except OSError as e:
        raise BackpackError(f"cannot reach the Ray cluster at {address!r}: {e.strerror or e}") from None


def target_address(cfg: RayConfig) -> str | None:
    """The cluster a run joins: `ray.address`, else $RAY_ADDRESS (set inside a Ray Job), else None (a local
    cluster is started)."""
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


def is_local(cfg: RayConfig) -> bool:
    return target_address(cfg) is None


def connect(cfg: RayConfig) -> bool:
    """Start a local Ray cluster (no address) or connect to the target address. Returns True if this call
    started or connected Ray (the caller then shuts it down), False if Ray was already initialised."""
    import ray

    if ray.is_initialized():
        return False
    address = target_address(cfg)
    # Ray prints banners and deduplicated worker logs; a CLI run wants only its own progress bar.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs = dict(namespace=cfg.namespace or DEFAULT_NAMESPACE, logging_level=logging.ERROR,
                  log_to_driver=bool(os.environ.get("BACKPACK_ACTOR_LOGS")))
    try:
        if address is None:
            ray.init(num_cpus=cfg.num_cpus, include_dashboard=cfg.dashboard, **kwargs)
        else:
            check_reachable(address)
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or "a local cluster"
        raise BackpackError(f"cannot start or connect to Ray at {where}: {e}") from None
    return True


def check_shared_state(cfg) -> None:
    """On a multi-node cluster, refuse an embedded Redis and a node-local storage folder (RunConfig `cfg`):
    ConfigError naming the fields, before anything is spawned."""
    from backpack.errors import ConfigError

    shared = cfg.storage.shared or cfg.storage.remote  # an object store is reachable from every node
    problems = multi_node_problems(cfg.redis.url, cfg.storage.path, shared, len(cluster_nodes()))
    if problems:
        raise ConfigError("for this cluster", problems)


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of each live node."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def check_placement(demands: list[Demand], groups: list[Group] | tuple = ()) -> None:
    """Raise ResourceError (required vs available) if the live cluster cannot place `demands` and `groups`."""
    problems = placement_problems(demands, cluster_nodes(), groups)
    if problems:
        raise ResourceError("the Ray cluster cannot place this run:\n" + "\n".join(f"  - {p}" for p in problems))
