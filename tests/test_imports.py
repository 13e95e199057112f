"""Imports inside `elastic/` run downward: no module imports (directly or through others) a module that imports it.

Every import counts, module-level or inside a function: a function-level import hides a circle from Python's
import machinery but not from the reader (the plan that imports a stage that imports the plan is one design,
not two). Checked on the source text (ast), so nothing is imported here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "elastic"

def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module an imported dotted name lands in (``elastic.plan.GiB`` -> ``elastic.plan``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the elastic modules it imports (anywhere in its body); every module counts, the families'
    own (a family package's submodules import only downward, never the package that re-exports them)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up `level - 1` packages
                    up = package.split(".")
                    base = ".".join(up[: len(up) - node.level + 1] + ([base] if base else []))
                # `from elastic.stages import distill` imports a module; `from elastic.plan import GiB` a name
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                if t.startswith("elastic"):
                    dep = _resolve(t, modules)
                    if dep and dep != name:
                        deps.add(dep)
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _path(graph, comp: list[str]) -> str:
    """One concrete circle through the component's first module, for the failure message."""
    start = comp[0]
    members = set(comp)
    prev = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                chain = [v]
                while prev[chain[-1]] is not None:
                    chain.append(prev[chain[-1]])
                return " -> ".join(reversed(chain)) + f" -> {start}"
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return ", ".join(comp)


def test_the_graph_sees_the_imports_it_must_see():
    """The walker finds module-level, function-level, `from package import module` and relative imports."""
    g = import_graph()
    assert "elastic.rundir" in g["elastic.train"]  # module level
    assert "elastic.parallel" in g["elastic.train"]  # inside a function
    assert "elastic.stages" in g["elastic.run"]  # `from elastic.stages import ORDER`
    # a family package: its interface imports its submodules; `from pkg import sub` lands in the submodule
    assert {"elastic.models.nemotron_h.sizes", "elastic.models.nemotron_h.plan"} <= g["elastic.models.nemotron_h"]
    assert "elastic.models.nemotron_h.sizes" in g["elastic.models.nemotron_h.surgery"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_in_elastic():
    g = import_graph()
    cycles = find_cycles(g)
    assert not cycles, "import circles: " + "; ".join(_path(g, c) for c in cycles)


def test_the_plan_is_below_the_stages_and_parallel():
    """The plan is a cost model: the stages, the trainer and `parallel` read it, it reads none of them."""
    g = import_graph()
    below = {"elastic.plan", "elastic.schedule"}
    above = {m for m in g if m.startswith("elastic.stages") or m in ("elastic.train", "elastic.parallel", "elastic.rehearse")}
    for m in below:
        assert not g[m] & above, f"{m} imports {sorted(g[m] & above)}"
