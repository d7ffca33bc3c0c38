"""The library's modules import each other as a stack of floors: no import circle.

Read with ``ast`` (nothing is imported), every ``import`` counts, also one inside a function: a
lazy import only hides a circle until the day someone moves it to the top of the module.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, package: str = "mmrepro") -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a ``from a.b import c`` names ``a.b.c`` where that
    is a module, else ``a.b``; importing a module also runs the ``__init__`` of its packages, except
    those of the importer's own packages, which are loading already)."""
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*here.split(".")[:len(here.split(".")) - node.level + 1], *filter(None, [base])])
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # ``import a.b.c`` where c is not a module
                    target = target.rpartition(".")[0]
                parts = target.split(".")
                for i in range(len(parts)):  # the module, and the packages whose __init__ it runs
                    dep = ".".join(parts[:i + 1])  # (not the importer's own: they are loading already)
                    if dep in files and dep != name and not name.startswith(dep + "."):
                        graph[name].add(dep)
    return graph


def _path(graph: dict[str, set[str]], start: str, goal: str, allowed: set[str]) -> list[str]:
    """A shortest import chain ``start -> ... -> goal`` through ``allowed`` modules."""
    came = {start: start}
    todo = [start]
    while goal not in came:
        node = todo.pop(0)
        for nxt in sorted(graph[node] & allowed):
            came.setdefault(nxt, node)
            todo.append(nxt)
    chain = [goal]
    while chain[-1] != start:
        chain.append(came[chain[-1]])
    return chain[::-1]


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (``a -> b -> ... -> a``) per group of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = {stack.pop()}
            while node not in group:
                group.add(stack.pop())
            groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for group in (g for g in groups if len(g) > 1):
        first = min(group)
        cycles.append([first, *_path(graph, min(graph[first] & group), first, group)])
    return cycles


def test_no_import_cycle():
    """Stricter than "none across folders": the knots this test was written for (config <-> tune,
    models.multimodal <-> its builders) each lay inside one folder."""
    cycles = import_cycles(import_graph(SRC))
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_check_finds_a_circle(tmp_path):
    pkg = tmp_path / "mmrepro"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "top.py").write_text("from mmrepro.low.base import thing\n")
    (pkg / "low" / "base.py").write_text("def thing():\n    from ..top import other\n")
    assert import_cycles(import_graph(tmp_path)) == [["mmrepro.low.base", "mmrepro.top", "mmrepro.low.base"]]
