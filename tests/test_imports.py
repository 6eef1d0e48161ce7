"""The package's import structure: no cycles between colocate's modules (function-level imports included),
and no Ray inside the transports (Ray belongs to the policy side, engine side, driver and rendezvous)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "colocate"
# The transports proper: they move bytes between two processes and know nothing of Ray.
PURE = ["refit/plan.py", "refit/schedule.py", "refit/errors.py", "refit/checksum.py", "refit/sizing.py"]
TRANSPORTS = sorted(str(p.relative_to(ROOT)) for pkg in ("refit/ipc", "refit/nccl") for p in (ROOT / pkg).glob("*.py"))


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module named by an import anywhere in the file (top level or inside a function)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in ROOT.rglob("*.py")}
    return {m: {i for i in _imports(p) if i in files and i != m} for m, p in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_inside_colocate():
    graph = _graph()
    assert graph.get("colocate.refit.ipc.receiver")  # the walk found imports
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_ray_inside_the_transports():
    assert len(TRANSPORTS) >= 10  # both packages found
    offenders = {t: sorted(i for i in _imports(ROOT / t) if i == "ray" or i.startswith("ray."))
                 for t in TRANSPORTS + PURE}
    assert {t: i for t, i in offenders.items() if i} == {}


def test_neither_transport_imports_the_other_nor_the_ray_sides():
    ray_sides = {"colocate.refit.policy_side", "colocate.refit.engine_side", "colocate.refit.driver",
                 "colocate.rendezvous"}
    for pkg, other in (("ipc", "nccl"), ("nccl", "ipc")):
        for path in (ROOT / "refit" / pkg).glob("*.py"):
            bad = sorted(i for i in _imports(path) if i.startswith(f"colocate.refit.{other}")
                         or any(i == m or i.startswith(m + ".") for m in ray_sides))
            assert bad == [], f"{path.relative_to(ROOT)} imports {bad}"
