"""Can the cluster place what a run asks for? Pure logic over resource dicts, no Ray.

`placement_problems` packs each actor's demand onto the nodes' total resources (first fit, largest demands
first) and returns human-readable problems: what is required versus what is available. An empty list means
every actor fits. Checking before spawning turns "hangs forever waiting for a placement" into a clear error.

Replicas reserved together in a Ray placement group are a `Group`: "strict_pack" needs one node that holds
every bundle, "strict_spread" needs a different node for each bundle; "pack" and "spread" are preferences
Ray may relax, so their bundles are checked like separate actors.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

Demand = tuple[str, dict[str, float]]   # (actor name, {"CPU": 1, "GPU": 0, "teacher": 1, ...})
# Names with their own fields (num_cpus, num_gpus, ...), never custom resources.
BUILT_IN = ("CPU", "GPU", "memory", "object_store_memory")


def check_custom_resources(custom: dict[str, float]) -> dict[str, float]:
    """Custom Ray resources, the names node operators give (`ray start --resources`): ValueError naming a
    built-in name or an amount that is not a number >= 0."""
    for name, amount in custom.items():
        if name in BUILT_IN:
            raise ValueError(f"{name!r} is not a custom resource (CPUs, GPUs and memory have settings of their own)")
        if not isinstance(amount, (int, float)) or amount < 0:
            raise ValueError(f"resource {name!r}: amount must be >= 0 (got {amount!r})")
    return custom


def bundle(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
    """What one actor or worker reserves, as Ray and the placement check take it: zero amounts left out."""
    need = {"CPU": cpus, "GPU": gpus, **custom}
    return {k: float(v) for k, v in need.items() if v}


@dataclass(frozen=True)
class Group:
    """Bundles reserved at once (a Ray placement group): `name` of the group, one bundle per replica."""

    name: str
    bundles: tuple[dict[str, float], ...]
    strategy: str   # pack, spread, strict_pack or strict_spread

    def demands(self) -> list[Demand]:
        return [(f"{self.name} bundle {i}", dict(b)) for i, b in enumerate(self.bundles)]


def _fmt(res: dict[str, float]) -> str:
    items = [(k, v) for k, v in sorted(res.items()) if v]
    return ", ".join(f"{k}={v:g}" for k, v in items) or "nothing"


def _fits(node: dict[str, float], need: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


def _take(node: dict[str, float], need: dict[str, float]) -> None:
    for k, v in need.items():
        node[k] = node.get(k, 0.0) - v


def _sum(bundles) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for b in bundles:
        for k, v in b.items():
            out[k] += v
    return dict(out)


def placement_problems(demands: list[Demand], nodes: list[dict[str, float]],
                       groups: list[Group] | tuple = ()) -> list[str]:
    """Problems placing `demands` (one actor each) and `groups` (placement groups) on `nodes` (each node: its
    total resources). [] when all fit."""
    every = list(demands) + [d for g in groups for d in g.demands()]
    total_req = _sum(d for _, d in every)
    total_avail = _sum(nodes)
    short = {k for k, v in total_req.items() if v > total_avail.get(k, 0.0) + 1e-9}
    if short:
        return ["the run needs " + _fmt(total_req) + " in all, the cluster has "
                + _fmt({k: total_avail.get(k, 0.0) for k in total_req}) + f" (short of {', '.join(sorted(short))})"]
    free = [dict(n) for n in nodes]
    where = "nodes: " + "; ".join(_fmt(n) for n in nodes)
    problems = []
    # Strict groups first: they constrain which node takes what; the loose demands then fill what is left.
    for g in groups:
        if g.strategy == "strict_pack":
            need = _sum(g.bundles)
            node = next((n for n in free if _fits(n, need)), None)
            if node is None:
                problems.append(f"{g.name} packs {len(g.bundles)} replica(s) on one node (strict_pack) and needs "
                                f"{_fmt(need)} there; no node has that much ({where})")
            else:
                _take(node, need)
        elif g.strategy == "strict_spread":
            used: set[int] = set()
            for i, b in enumerate(g.bundles):
                j = next((j for j, n in enumerate(free) if j not in used and _fits(n, b)), None)
                if j is None:
                    problems.append(f"{g.name} spreads {len(g.bundles)} replica(s) over different nodes "
                                    f"(strict_spread), each needing {_fmt(b)}; only {i} node(s) can take one "
                                    f"({where})")
                    break
                used.add(j)
                _take(free[j], b)
    loose = list(demands) + [d for g in groups if g.strategy in ("pack", "spread") for d in g.demands()]
    for name, d in sorted(loose, key=lambda x: -sum(x[1].values())):
        node = next((n for n in free if _fits(n, d)), None)
        if node is None:
            problems.append(f"{name} needs {_fmt(d)} on one node; no node has that much left ({where})")
        else:
            _take(node, d)
    return problems


def multi_node_problems(redis_url: str | None, storage_path: str, storage_shared: bool, nodes: int) -> list[str]:
    """What a run on a cluster of `nodes` live nodes cannot do with this Redis and storage: state every node
    must reach cannot live on the driver's machine alone. [] on one node or when both are shared (an object-store
    storage path counts as shared)."""
    if nodes <= 1:
        return []
    problems = []
    if redis_url is None:
        problems.append(f"redis.url: not set, so the run would start an embedded Redis on this machine, but the "
                        f"Ray cluster has {nodes} nodes and actors on the others cannot rely on reaching it: set "
                        "redis.url to a Redis server every node reaches (redis://host:6379/0)")
    if not storage_shared:
        problems.append(f"storage.path: {storage_path!r} may be a folder of this machine only, and on a {nodes}-node "
                        "cluster each node would write its own copy: put it on a mount every node sees at the same "
                        "path (NFS, a cloud file share; or all nodes on this machine) and set storage.shared: true")
    return problems
