"""The house rules a test can keep (DEVELOPERS.md, "Rules of the house"): no import cycle in backpack/, each
floor imports only the floors below it, backpack.core imports no Ray, Redis or transformers, and no module is
over 450 lines. Imports are read from the source at any depth (inside functions too), nothing is run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "backpack"
# The floors, lowest first: a module imports its own part and the floors below it, never a floor above nor
# another part of its own floor (parts of one floor stay independent of each other).
FLOORS = [("core", "errors"), ("config",), ("runtime",), ("data",), ("teachers",), ("mental",),
          ("scheduling", "student"), ("eval", "serve", "synthesis"), ("run",), ("cli",)]
CORE_MAY_NOT_IMPORT = ("ray", "redis", "transformers")
MAX_LINES = 450


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = p
    return out


def imports(name: str, path: Path) -> set[str]:
    """Every module name `name` imports, at any depth (relative imports resolved)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def import_graph() -> dict[str, set[str]]:
    """backpack module -> the backpack modules it imports."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        edges = set()
        for target in imports(name, path):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target not in (name, "backpack") and not name.startswith(target + "."):
                edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif w not in index:
                index[w] = low[w] = counter[0]
                counter[0] += 1
                stack.append(w)
                on.add(w)
                work.append((w, iter(sorted(graph.get(w, ())))))
            elif w in on:
                low[v] = min(low[v], index[w])
    return out


def part(module: str) -> str:
    return module.split(".")[1]


def floor(module: str) -> int:
    return next(i for i, parts in enumerate(FLOORS) if part(module) in parts)


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_backpack():
    assert cycles(import_graph()) == []


def test_every_part_has_a_floor():
    assert {part(m) for m in modules() if m != "backpack"} <= {p for parts in FLOORS for p in parts}


def test_each_floor_imports_only_the_floors_below_it():
    wrong = sorted(f"{m} -> {t}" for m, targets in import_graph().items() if m != "backpack" for t in targets
                   if part(t) != part(m) and floor(t) >= floor(m))
    assert wrong == [], "imports of a floor above or of another part of the same floor:\n" + "\n".join(wrong)


def test_core_imports_no_ray_redis_or_transformers():
    bad = sorted(f"{m} imports {t}" for m, p in modules().items() if m.startswith("backpack.core")
                 for t in imports(m, p) if t.split(".")[0] in CORE_MAY_NOT_IMPORT)
    assert bad == []


@pytest.mark.parametrize("path", sorted(modules().values()), ids=lambda p: str(p.relative_to(PKG.parent)))
def test_module_is_small(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PKG.parent)} has {n} lines (at most {MAX_LINES}: split it by role)"


def test_plain_classes_become_actors_in_one_place():
    """`ray.remote` is applied in backpack/run/actors.py only: everything else is plain classes and functions."""
    calls = sorted(f"{m}" for m, p in modules().items() for node in ast.walk(ast.parse(p.read_text()))
                   if isinstance(node, ast.Attribute) and node.attr == "remote" and isinstance(node.value, ast.Name)
                   and node.value.id == "ray")
    assert set(calls) == {"backpack.run.actors"}
