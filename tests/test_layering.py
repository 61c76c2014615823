"""The import layering: runtime -> planner -> cost_models, never back, and no import cycle
between the modules of one package. Read from the source with `ast` (imports at the top of a
module and inside functions alike), so nothing is imported to check it."""
import ast
import importlib.util
from pathlib import Path

import networkx as nx
import pytest

LAYERS = ("cost_models", "planner", "runtime")   # each may import only the ones before it


def package_dir(package: str) -> Path:
    """Where `package` is imported from (the tree under test), found without running it."""
    return Path(importlib.util.find_spec(package).submodule_search_locations[0])


def module_files() -> dict:
    """Dotted module name -> source file, for every module of the three packages."""
    files = {}
    for package in LAYERS:
        root = package_dir(package)
        for path in sorted(root.rglob("*.py")):
            parts = (package, *path.relative_to(root).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_modules(module: str, path: Path, modules) -> set:
    """The modules among `modules` that `module` imports, relative imports resolved: for
    `from X import Y`, X.Y when Y is a submodule, else X; for a dotted name not itself a
    module (`import X.Y` of a module X), the deepest module it names."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                         for alias in node.names)
    found = set()
    for name in names:
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        found.add(".".join(parts))
    return found - {"", module}


def import_graph() -> nx.DiGraph:
    """module -> each module of the three packages that it imports."""
    files = module_files()
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for module, path in files.items():
        graph.add_edges_from((module, target) for target in imported_modules(module, path, files))
    return graph


GRAPH = import_graph()


def cycles_in(package: str) -> list:
    """Import cycles among `package`'s modules, each as 'a -> b -> a'."""
    inside = GRAPH.subgraph(m for m in GRAPH if m.split(".")[0] == package)
    return sorted(" -> ".join(c + c[:1]) for c in nx.simple_cycles(inside))


def test_the_graph_sees_the_packages():
    assert {"cost_models.calibration", "cost_models.compute", "planner", "runtime"} <= set(GRAPH)
    assert GRAPH.has_edge("cost_models.compute", "cost_models.calibration")
    for package in ("planner", "runtime"):
        assert any(a.split(".")[0] == package and b.split(".")[0] == "cost_models" for a, b in GRAPH.edges)


def test_imports_inside_functions_and_relative_ones_count(tmp_path):
    (tmp_path / "a.py").write_text("from . import b\nfrom .c import f\n")
    (tmp_path / "b.py").write_text("import os\n\ndef g():\n    from pkg.a import x\n")
    (tmp_path / "c.py").write_text("def f():\n    import pkg.b.missing\n")
    modules = {f"pkg.{name}": tmp_path / f"{name}.py" for name in "abc"}
    assert imported_modules("pkg.a", modules["pkg.a"], modules) == {"pkg.b", "pkg.c"}
    assert imported_modules("pkg.b", modules["pkg.b"], modules) == {"pkg.a"}
    assert imported_modules("pkg.c", modules["pkg.c"], modules) == {"pkg.b"}


@pytest.mark.parametrize("lower, higher", [(a, b) for i, a in enumerate(LAYERS) for b in LAYERS[i + 1:]])
def test_lower_layers_do_not_import_higher_ones(lower, higher):
    wrong = sorted(f"{a} imports {b}" for a, b in GRAPH.edges
                   if a.split(".")[0] == lower and b.split(".")[0] == higher)
    assert not wrong, f"{lower} must not import {higher}: " + "; ".join(wrong)


# cost_models' own layers, lowest first: the calibration record <- the models <- fitting <- profiling.
COST_MODEL_LAYERS = (("cost_models.calibration",), ("cost_models.compute", "cost_models.comm"),
                     ("cost_models.fitting",), ("cost_models.profiling",))


@pytest.mark.parametrize("lower, higher", [(a, b) for i, layer in enumerate(COST_MODEL_LAYERS)
                                           for a in layer for above in COST_MODEL_LAYERS[i + 1:] for b in above])
def test_cost_model_layers_import_only_downwards(lower, higher):
    assert not nx.has_path(GRAPH, lower, higher), \
        f"{lower} reaches {higher}: " + " -> ".join(nx.shortest_path(GRAPH, lower, higher))


@pytest.mark.parametrize("package", LAYERS)
def test_no_import_cycle_inside_a_package(package):
    cycles = cycles_in(package)
    assert not cycles, f"import cycles in {package}: " + "; ".join(cycles)
