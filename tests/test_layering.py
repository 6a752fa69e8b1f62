"""The package's dependency direction, ops <- engine <- applications <- CLI, read from the source:
every import (module-level or inside a function) of every module under dinv/ is an edge, and
the graph must have no cycle and no edge against the direction."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "dinv"
APPLICATIONS = ("dinv.distill", "dinv.prune", "dinv.continual")
# Public APIs an application may call (prune fine-tunes through distillation).
ALLOWED_APPLICATION_EDGES = {("dinv.prune", "dinv.distill"), ("dinv.continual", "dinv.distill")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve(name: str) -> str | None:
    """The dinv module an imported dotted name refers to (the longest existing prefix)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def imports_of(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    package = module if is_package(module) else module.rpartition(".")[0]
    edges = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import sub` names a submodule when one exists, else an attribute of pkg.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            resolved = resolve(target)
            if resolved is not None and resolved != module:
                edges.add(resolved)
    return edges


GRAPH = {module: imports_of(module) for module in MODULES}


def cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return result


def test_the_walk_sees_function_level_imports():
    # cli.invert imports the data module inside run(): the walk must see it.
    assert "dinv.data" in GRAPH["dinv.cli.invert"]
    assert "dinv.inverter" in GRAPH["dinv.cli.common"]


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def test_the_detector_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def layer(module: str) -> str:
    if module == "dinv.cli" or module.startswith("dinv.cli.") or module == "dinv.__main__":
        return "cli"
    if module in APPLICATIONS:
        return "application"
    if module == "dinv.ops" or module.startswith("dinv.ops."):
        return "ops"
    return "engine"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_dependency_direction(module):
    rank = {"ops": 0, "engine": 1, "application": 2, "cli": 3}
    mine = layer(module)
    for target in GRAPH[module]:
        theirs = layer(target)
        if module == "dinv" and theirs != "cli":
            continue  # the package root re-exports the public API of every layer below the CLI
        if theirs == "engine" and target == "dinv" and mine != "cli":
            pytest.fail(f"{module} imports the package root (import its modules instead)")
        assert rank[theirs] <= rank[mine], f"{module} ({mine}) imports {target} ({theirs})"
        if mine == theirs == "application":
            assert (module, target) in ALLOWED_APPLICATION_EDGES, \
                f"{module} imports another application's module {target}"
