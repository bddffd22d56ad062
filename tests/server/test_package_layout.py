"""The package layout draws the architecture, and these checks keep it drawn.

- ``server/`` holds packages, one per stage of the loop (and core, db, identity, api, cli); the
  only modules directly in it are ``__init__``, ``main`` (the app factory) and ``services`` (the
  composition root).
- The import graph of ``server`` (every ``import`` statement, at any depth, read with ``ast``) has
  no cycle among modules and none among its subpackages, and no function-level import of a
  ``server`` module: such an import dodges a cycle, and the fix is to move the shared piece down.
- The top-level packages depend in one direction: contract -> device_agent / training -> server.

A failure names the cycle, the late import or the forbidden import, with file and line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOT_MODULES = {"__init__.py", "main.py", "services.py"}
# Function-level imports of server modules that are allowed, as (importing module, imported
# module). Add one only for a reason other than dodging a cycle, and say it here.
ALLOWED_LATE: set[tuple[str, str]] = {
    # The S3 backend imports obstore, the optional `s3` extra: loaded only for an s3:// store.
    ("server.release.artifacts", "server.release.artifacts._object"),
}
# Top-level packages each package must never import (contract is the bottom layer).
FORBIDDEN = {
    "contract": {"device_agent", "training", "server", "firmware_sim", "benchmarks"},
    "device_agent": {"training", "server", "firmware_sim", "benchmarks"},
    "training": {"device_agent", "server", "firmware_sim", "benchmarks"},
}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str  # the dotted name as written, resolved for relative imports
    path: Path
    line: int
    late: bool  # inside a function (executed when called, not when the module loads)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> Iterator[Import]:
    """Every import statement of ``path``, at module level or nested in functions/classes."""
    return imports_in(path.read_text(), module_name(path), path)


def imports_in(source: str, name: str, path: Path) -> Iterator[Import]:
    """The imports of ``source``, the text of module ``name`` (relative ones resolved)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(source, filename=str(path))

    def walk(node: ast.AST, late: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            nested = late or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(name, alias.name, path, child.lineno, late)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package[: len(package) - (child.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in child.names:
                    # ``from pkg import mod`` imports the module pkg.mod when there is one.
                    yield Import(name, f"{base}.{alias.name}", path, child.lineno, late)
            else:
                yield from walk(child, nested)

    return walk(tree, False)


def server_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((REPO / "server").rglob("*.py"))}


def resolve(dotted: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``dotted`` that is one of ``modules`` (None: outside them)."""
    while dotted:
        if dotted in modules:
            return dotted
        dotted = dotted.rpartition(".")[0]
    return None


def server_graph() -> tuple[dict[str, set[str]], list[Import]]:
    """Module -> the server modules it imports; and every server import made in a function."""
    modules = server_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    late: list[Import] = []
    for module, path in modules.items():
        for imp in imports_of(path):
            target = resolve(imp.imported, modules)
            if target is None or target == module:
                continue
            graph[module].add(target)
            if imp.late:
                late.append(imp)
    return graph, late


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def subpackage(module: str) -> str:
    """``server.rollout.engine`` -> ``server.rollout``; root modules stay themselves."""
    return ".".join(module.split(".")[:2])


def test_server_root_holds_only_the_app_factory_and_the_composition_root() -> None:
    stray = sorted(p.name for p in (REPO / "server").glob("*.py") if p.name not in ROOT_MODULES)
    assert not stray, f"modules directly in server/ (put them in a stage package): {stray}"


def test_no_import_cycle_among_server_modules() -> None:
    graph, _ = server_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle among server modules: " + " -> ".join(cycle or [])


def test_no_import_cycle_among_server_packages() -> None:
    graph, _ = server_graph()
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges = packages.setdefault(subpackage(module), set())
        edges.update(subpackage(t) for t in targets if subpackage(t) != subpackage(module))
    cycle = find_cycle(packages)
    if cycle is not None:
        # Name the module imports behind each edge of the package cycle.
        why = [
            f"  {a} -> {b}: "
            + ", ".join(
                sorted(
                    f"{m} imports {t}"
                    for m, ts in graph.items()
                    for t in ts
                    if subpackage(m) == a and subpackage(t) == b
                )
            )
            for a, b in zip(cycle, cycle[1:], strict=False)
        ]
        raise AssertionError(
            "import cycle among server packages: " + " -> ".join(cycle) + "\n" + "\n".join(why)
        )


def test_no_function_level_import_of_a_server_module() -> None:
    _, late = server_graph()
    found = [
        f"{imp.path.relative_to(REPO)}:{imp.line}: {imp.importer} imports {imp.imported}"
        for imp in late
        if (imp.importer, resolve(imp.imported, server_modules())) not in ALLOWED_LATE
    ]
    assert not found, (
        "function-level imports of server modules (move the shared piece down instead):\n"
        + "\n".join(found)
    )


def test_top_level_packages_depend_in_one_direction() -> None:
    found = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((REPO / package).rglob("*.py")):
            for imp in imports_of(path):
                top = imp.imported.split(".")[0]
                if top in forbidden:
                    found.append(
                        f"{path.relative_to(REPO)}:{imp.line}: {package} imports {imp.imported}"
                    )
    assert not found, "imports against contract -> device_agent/training -> server:\n" + "\n".join(
        found
    )


def test_the_checks_see_a_cycle_and_a_late_import() -> None:
    """The checks themselves: a planted cycle is found in order, a nested import is late."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None
    source = "import server.db.base\n\ndef f():\n    from .. import services\n"
    found = list(imports_in(source, "server.rollout.probe", REPO / "server/rollout/probe.py"))
    assert [(i.imported, i.late) for i in found] == [
        ("server.db.base", False),
        ("server.services", True),
    ]
    assert resolve("server.db.base.utcnow", server_modules()) == "server.db.base"


# The monitoring statistics are pure (issue 14): numbers and histograms in, verdicts out. They
# import only these (besides one another); the stateful shell beside them in server/monitoring
# (references, windows, alerts, evaluator, webhook) feeds them.
PURE_MONITORING = {
    "server.monitoring",
    "server.monitoring._errors",
    "server.monitoring.drift",
    "server.monitoring.estimate",
    "server.monitoring.rules",
}
PURE_ALLOWED = {
    "__future__",
    "collections",
    "dataclasses",
    "enum",
    "functools",
    "math",
    "typing",
    "zlib",
    "numpy",
    "scipy",
    "contract",
}


def test_the_monitoring_statistics_import_nothing_stateful() -> None:
    modules = server_modules()
    found = []
    for name in sorted(PURE_MONITORING):
        for imp in imports_of(modules[name]):
            target = resolve(imp.imported, modules)
            ok = (
                target in PURE_MONITORING
                if imp.imported.startswith("server")
                else imp.imported.split(".")[0] in PURE_ALLOWED
            )
            if not ok:
                found.append(f"{imp.path.relative_to(REPO)}:{imp.line}: imports {imp.imported}")
    assert not found, "pure monitoring modules importing I/O or the server:\n" + "\n".join(found)
    # The check sees a violation: the evaluator (stateful) would fail it.
    assert any(
        imp.imported.startswith("sqlalchemy")
        for imp in imports_of(modules["server.monitoring.evaluator"])
    )
