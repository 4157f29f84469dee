"""The package's import graph: no cycle, and every import points to the module's own layer or a lower one
(issue 17, "Layers point both ways"; docs/ARCHITECTURE.md).

The graph is read from the source with ast, so it sees every `import` and `from ... import` in a module,
the ones inside functions included (a lazy import still ties the two modules together). `from planner.x
import name` where planner.x.name is a module counts as importing that submodule; otherwise it imports
planner.x itself (its __init__, which counts as a module of its own). The implicit import of a parent
package when a submodule loads is not an edge: it would put every package in a cycle with its children.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "planner"

# Lowest first. A module belongs to the layer of the longest prefix that names it; `planner` alone is the
# root package (a docstring and the version), which sits with core because it imports nothing.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("planner", "planner.core")),
    ("inputs", ("planner.catalog", "planner.files", "planner.userdata", "planner.importers")),
    ("cost", ("planner.cost",)),
    ("search", ("planner.search", "planner.planners", "planner.planfile")),
    ("clients", ("planner.eval", "planner.export", "planner.backends")),
    ("app", ("planner.app",)),
]


def module_names(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (an __init__ is named by its package)."""
    root = package_dir.parent
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _absolute(module: str | None, level: int, importer: str, importer_is_package: bool) -> str:
    """The absolute name a (possibly relative) `from` import refers to."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    # A relative import counts from the importer's package: the module itself for an __init__.
    keep = len(base) - level + (1 if importer_is_package else 0)
    prefix = base[:keep]
    return ".".join(prefix + ([module] if module else []))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that module `name` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node.module, node.level, name, is_package)
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in modules:
                    found.add(submodule)
                elif target in modules:
                    found.add(target)
    found.discard(name)
    return found


def import_graph(package_dir: Path = PACKAGE_DIR) -> nx.DiGraph:
    modules = module_names(package_dir)
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        graph.add_edges_from((name, target) for target in imports_of(name, path, modules))
    return graph


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix naming the module; KeyError for a module no layer names."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise KeyError(module)
    return best


def cycles(graph: nx.DiGraph) -> list[list[str]]:
    """Every strongly connected component of more than one module, sorted: each holds at least one cycle."""
    return sorted(sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1)


def upward_imports(graph: nx.DiGraph) -> list[str]:
    """`importer (layer) -> imported (layer)` for every edge that points to a higher layer."""
    bad = []
    for src, dst in sorted(graph.edges):
        if layer_of(dst) > layer_of(src):
            bad.append(f"{src} ({LAYERS[layer_of(src)][0]}) -> {dst} ({LAYERS[layer_of(dst)][0]})")
    return bad


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    return import_graph()


def test_graph_sees_known_imports(graph):
    # The reader must find what is plainly there, or the two checks below would pass on an empty graph.
    assert graph.number_of_nodes() > 50
    assert graph.has_edge("planner.cost.estimate", "planner.core.plan")
    assert graph.has_edge("planner.app.commands.plan", "planner.search.search")
    # `from planner.cost import estimate` names the submodule, not the package's __init__.
    assert graph.has_edge("planner.app.viz", "planner.cost.estimate")
    assert not graph.has_edge("planner.app.viz", "planner.cost")


def test_every_module_has_a_layer(graph):
    unplaced = []
    for module in graph.nodes:
        try:
            layer_of(module)
        except KeyError:
            unplaced.append(module)
    assert unplaced == [], f"modules no layer names (add them to LAYERS): {unplaced}"


def test_no_import_cycle(graph):
    assert cycles(graph) == [], "import cycles (each group imports itself through the others)"


def test_imports_point_down(graph):
    assert upward_imports(graph) == [], "imports of a higher layer"


def test_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    # A small package with one cycle (a <-> b, through a function-level and a relative import) and one
    # upward import (core -> app) must fail both checks, so the checks above can fail.
    pkg = tmp_path / "planner"
    for sub in ("core", "app"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from planner.core import b\n")
    (pkg / "core" / "b.py").write_text("from .a import f\n")
    (pkg / "core" / "c.py").write_text("import planner.app.d\n")
    (pkg / "app" / "d.py").write_text("from planner.core.a import f\n")
    small = import_graph(pkg)
    assert cycles(small) == [["planner.core.a", "planner.core.b"]]
    assert upward_imports(small) == ["planner.core.c (core) -> planner.app.d (app)"]
