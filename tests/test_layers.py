"""The import edges between rbee's packages and modules are the ones the design allows.

`rbee_common` imports no program; each daemon imports `rbee_common` and not
another daemon, except the queen, which runs a hive in-process
(`--local-hive`) and so imports `rbee_hive` from the few modules named in
`QUEEN_TO_HIVE`; the keeper talks to the queen over HTTP only. No module
imports itself back through others (imports under `if TYPE_CHECKING:` are
left out: they are annotations, not imports at run time).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rbee_common", "rbee_hive", "rbee_queen", "rbee_worker", "rbee_keeper")

ALLOWED: dict[str, frozenset[str]] = {
    "rbee_common": frozenset(),
    "rbee_worker": frozenset({"rbee_common"}),
    "rbee_hive": frozenset({"rbee_common"}),
    "rbee_keeper": frozenset({"rbee_common"}),
    "rbee_queen": frozenset({"rbee_common", "rbee_hive"}),
}
"""Which packages each package may import."""

QUEEN_TO_HIVE = {
    "rbee_queen.serve": "builds the in-process hive of --local-hive",
    "rbee_queen.fleet.hives": "the in-process hive's transport calls its HiveService",
    "rbee_queen.service": "holds the in-process hives it is given (a type)",
    "rbee_queen.config": "the [hive] settings a reload cannot change (RESTART_ONLY)",
}
"""The only queen modules that import `rbee_hive`, and why."""

Graph = dict[str, set[str]]


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _type_checking_only(tree: ast.Module) -> set[int]:
    """The line numbers of the imports under `if TYPE_CHECKING:`."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines |= {n.lineno for child in node.body for n in ast.walk(child) if hasattr(n, "lineno")}
    return lines


def import_graph() -> Graph:
    """Each module of rbee's packages and the rbee modules it imports at run time (lazy imports
    inside functions included)."""
    modules = _modules()
    graph: Graph = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skipped = _type_checking_only(tree)
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skipped:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    if target in modules:
                        graph[name].add(target)
                    elif node.module in modules:
                        graph[name].add(node.module)
            elif isinstance(node, ast.Import):
                graph[name] |= {alias.name for alias in node.names if alias.name in modules}
    return graph


def package(module: str) -> str:
    return module.split(".")[0]


def layer_violations(graph: Graph) -> list[str]:
    """Every edge the tables above do not allow."""
    wrong = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            source_package, target_package = package(module), package(target)
            if source_package == target_package:
                continue
            if target_package not in ALLOWED.get(source_package, frozenset()):
                wrong.append(f"{module} imports {target}: {source_package} may not import {target_package}")
            elif target_package == "rbee_hive" and module not in QUEEN_TO_HIVE:
                wrong.append(f"{module} imports {target}: only {', '.join(QUEEN_TO_HIVE)} may import rbee_hive")
    return wrong


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected sets of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def planted(graph: Graph, edges: Iterable[tuple[str, str]]) -> Graph:
    copy = {module: set(targets) for module, targets in graph.items()}
    for source, target in edges:
        copy[source].add(target)
    return copy


def test_packages_import_only_what_their_layer_allows() -> None:
    assert layer_violations(import_graph()) == []


def test_no_module_imports_itself_back() -> None:
    assert cycles(import_graph()) == []


def test_a_planted_upward_import_is_found() -> None:
    """The checks can fail: an import from rbee_common up into the queen, from the worker into the
    hive, and from a queen module not in the table into the hive are each named; so is a cycle."""
    graph = import_graph()
    assert layer_violations(planted(graph, [("rbee_common.wire", "rbee_queen.service")])) == [
        "rbee_common.wire imports rbee_queen.service: rbee_common may not import rbee_queen"]
    assert layer_violations(planted(graph, [("rbee_worker.engine", "rbee_hive.catalog")])) == [
        "rbee_worker.engine imports rbee_hive.catalog: rbee_worker may not import rbee_hive"]
    assert layer_violations(planted(graph, [("rbee_queen.scheduler", "rbee_hive.catalog")])) == [
        "rbee_queen.scheduler imports rbee_hive.catalog: only " + ", ".join(QUEEN_TO_HIVE)
        + " may import rbee_hive"]
    (cycle,) = cycles(planted(graph, [("rbee_common.errors", "rbee_common.wire")]))
    assert {"rbee_common.errors", "rbee_common.wire"} <= set(cycle)


def test_the_graph_sees_the_imports() -> None:
    graph = import_graph()
    assert "rbee_common.wire" in graph["rbee_queen.service"]
    assert "rbee_hive.service" in graph["rbee_queen.serve"]


def imports_of(folder: str) -> dict[str, set[str]]:
    """Each module of a folder and the modules it imports (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
        found[str(path.relative_to(ROOT))] = names
    return found


def test_benchmarks_and_the_harness_import_no_test() -> None:
    """What tests and benchmarks share lives in `harness/`: neither it nor `bench/` reaches into
    `tests/`, and rbee's own packages import neither."""
    wrong = [f"{module} imports {name}" for folder in ("bench", "harness")
             for module, names in imports_of(folder).items() for name in names
             if name == "tests" or name.startswith("tests.")]
    assert wrong == []
    wrong = [f"{module} imports {name}" for package in PACKAGES for module, names in imports_of(package).items()
             for name in names if name.split(".")[0] in ("tests", "harness", "bench", "bdd")]
    assert wrong == []
