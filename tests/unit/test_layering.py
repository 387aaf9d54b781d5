"""The layers, checked: every import in tdist/ (top-level, lazy ones inside functions, and the
ones under `if TYPE_CHECKING:`) is read from the AST and resolved to the file it names.

Rules (docs/architecture.md):
- runtime/ never imports cli/, spec/, plan/ or launch/ (it runs on compute nodes from a plan file);
- operators/ never import launch/ or cli/;
- only cli/ imports cli/;
- no two files import each other, directly or in a ring.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "tdist"

FORBIDDEN = {
    "runtime": ("cli", "spec", "plan", "launch"),
    "operators": ("launch", "cli"),
    "spec": ("cli", "launch", "runtime", "operators"),
    "plan": ("cli", "launch", "operators"),
    "launch": ("cli",),
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is a module of tdist (a package resolves to its __init__)."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules:
            return cand
        parts.pop()
    return None


def imports_of(mod: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every tdist module `mod` imports anywhere in its file (lazy and TYPE_CHECKING included)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tdist":
                    target = _resolve(alias.name, modules)
                    if target:
                        found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] != "tdist":
                continue
            for alias in node.names:  # `from pkg import submodule` names the submodule's file
                sub = f"{name}.{alias.name}"
                if sub in modules:
                    found.add(sub)
                    continue
                target = _resolve(name, modules)
                if target:
                    found.add(target)
    found.discard(mod)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; returns the components with more than one file."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _ring_path(graph: dict[str, set[str]], comp: list[str]) -> str:
    """One concrete ring inside a component, for the failure message."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    path = [start]
                    cur = node
                    while cur != start:
                        path.append(cur)
                        cur = prev[cur]
                    return " -> ".join([start] + list(reversed(path[1:])) + [start])
                if nxt not in prev:
                    prev[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return ", ".join(comp)


def test_the_import_reader_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from tdist.launch.rundir import RunState\n"
        "def f():\n    import tdist.cli.app\n    from tdist.plan import emit\n    from . import loader\n"
    )
    modules = all_modules()
    got = imports_of("tdist.runtime.m", src, modules)
    assert {"tdist.launch.rundir", "tdist.cli.app", "tdist.plan.emit", "tdist.runtime.loader"} <= got


def test_ring_finder_finds_a_three_file_ring() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    comps = strongly_connected(graph)
    assert comps == [["a", "b", "c"]]
    assert _ring_path(graph, comps[0]) == "a -> b -> c -> a"


def test_layers_import_only_downwards() -> None:
    graph = import_graph()
    bad = []
    for mod, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer(target) in FORBIDDEN.get(layer(mod), ()) or (layer(target) == "cli" and layer(mod) not in ("cli", "__main__")):
                bad.append(f"{mod} imports {target}")
    assert not bad, "forbidden import directions:\n  " + "\n  ".join(bad)


def test_no_import_rings() -> None:
    graph = import_graph()
    rings = [_ring_path(graph, comp) for comp in strongly_connected(graph)]
    assert not rings, "files that import each other (directly or in a ring):\n  " + "\n  ".join(rings)
