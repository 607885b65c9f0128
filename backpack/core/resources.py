"""Can the cluster place what a run asks for? Pure logic over resource dicts, no Ray.

`placement_problems` packs each actor's demand onto the nodes' total resources (first fit, largest demands
first) and returns human-readable problems: what is required versus what is available. An empty list means
every actor fits. Checking before spawning turns "hangs forever waiting for a placement" into a clear error.
"""

from __future__ import annotations

from collections import defaultdict

Demand = tuple[str, dict[str, float]]   # (actor name, {"CPU": 1, "GPU": 0, "teacher": 1, ...})


def _fmt(res: dict[str, float]) -> str:
    items = [(k, v) for k, v in sorted(res.items()) if v]
    return ", ".join(f"{k}={v:g}" for k, v in items) or "nothing"


def placement_problems(demands: list[Demand], nodes: list[dict[str, float]]) -> list[str]:
    """Problems placing `demands` on `nodes` (each node: its total resources). [] when all fit."""
    total_req: dict[str, float] = defaultdict(float)
    total_avail: dict[str, float] = defaultdict(float)
    for _, d in demands:
        for k, v in d.items():
            total_req[k] += v
    for n in nodes:
        for k, v in n.items():
            total_avail[k] += v
    problems = []
    short = {k: v for k, v in total_req.items() if v > total_avail.get(k, 0.0) + 1e-9}
    if short:
        problems.append("the run needs " + _fmt(dict(total_req)) + " in all, the cluster has "
                        + _fmt({k: total_avail.get(k, 0.0) for k in total_req})
                        + f" (short of {', '.join(sorted(short))})")
        return problems
    free = [dict(n) for n in nodes]
    for name, d in sorted(demands, key=lambda x: -sum(x[1].values())):
        for node in free:
            if all(node.get(k, 0.0) + 1e-9 >= v for k, v in d.items()):
                for k, v in d.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            problems.append(f"{name} needs {_fmt(d)} on one node; no node has that much left "
                            f"(nodes: {'; '.join(_fmt(n) for n in nodes)})")
    return problems
