"""The package's import graph has no cycle, counting imports inside functions too.

Every module is parsed with ``ast``; an edge A -> B is any project import in A, at module level or
in a function body: ``import entropy_guided_generation.x``, ``from entropy_guided_generation.x import y``
(to ``x.y`` when that is a module, else to ``x``), relative ``from . import y``, and
``importlib.import_module("entropy_guided_generation...")`` with a string literal or a module-level
constant. A package ``__init__`` that imports its submodules has edges to them (the implicit import
of a module's parent packages is not an edge). A module that needs its caller is in the wrong place:
move the shared code into a layer below both.

The same holds one level up: collapsing every subpackage (``generation``, ``eval``, ``sampling``, ...)
into one node, and each top-level module into its own, leaves no cycle either. Two subpackages that
import each other are one concept split wrong: the glue belongs in the layer above both.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Callable

PACKAGE = "entropy_guided_generation"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the package (``__init__`` named as its package)."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def _string_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "text"`` assignments (a module name handed to ``import_module``)."""
    return {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    }


def _import_module_target(node: ast.Call, constants: dict[str, str]) -> str | None:
    """The module ``importlib.import_module(...)`` names, when given as a literal or a module constant."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name != "import_module" or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    return constants.get(arg.id) if isinstance(arg, ast.Name) else None


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``module`` imports anywhere in its source."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    constants = _string_constants(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = (
                _resolve_relative(module, is_package, node.level, node.module) if node.level else (node.module or "")
            )
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in known else source)
        elif isinstance(node, ast.Call):
            found.add(_import_module_target(node, constants) or "")
    return {name for name in found if name in known and name != module}


def _imported_names(node: ast.AST, constants: dict[str, str]) -> list[str]:
    """Module names an import statement or ``import_module`` call names ("." for a relative import)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        return ["." if node.level else node.module or ""]
    if isinstance(node, ast.Call):
        return [_import_module_target(node, constants) or ""]
    return []


def function_level_imports(path: Path) -> list[str]:
    """``line: statement`` of each project import inside a function body (nested ones once)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    constants = _string_constants(tree)
    inside = {
        node
        for function in ast.walk(tree)
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(function)
        if any(name == "." or name.split(".")[0] == PACKAGE for name in _imported_names(node, constants))
    }
    return [f"{node.lineno}: {ast.unparse(node)}" for node in sorted(inside, key=lambda n: (n.lineno, n.col_offset))]


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {module: imported_modules(module, path, known) for module, path in files.items()}


def package_unit(module: str) -> str:
    """The node ``module`` counts as in the package-level graph: its subpackage
    (``entropy_guided_generation.eval.lm`` -> ``entropy_guided_generation.eval``), or itself when it
    sits at the top (``entropy_guided_generation.layout``, the root package)."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``graph`` with every module replaced by its :func:`package_unit` (edges inside a unit dropped)."""
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        unit = package_unit(module)
        units.setdefault(unit, set()).update(package_unit(t) for t in targets if package_unit(t) != unit)
    return units


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), each as a path
    ``[a, b, ..., a]`` through its modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start] + path[::-1][1:] + [start]
                if target not in parents:
                    parents[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start} in component {sorted(component)}")


def test_find_cycles_reports_a_cycle_as_a_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_sees_function_level_and_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from . import a\n")
    (package / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (package / "b.py").write_text("import importlib\nimportlib.import_module('pkg.a')\n")
    (package / "c.py").write_text("import importlib\nNAME = 'pkg.b'\ndef f():\n    importlib.import_module(NAME)\n")
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c"}
    assert imported_modules("pkg", package / "__init__.py", known) == {"pkg.a"}
    assert imported_modules("pkg.a", package / "a.py", known) == {"pkg.b"}
    assert imported_modules("pkg.b", package / "b.py", known) == {"pkg.a"}
    assert imported_modules("pkg.c", package / "c.py", known) == {"pkg.b"}


def test_package_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50, f"found only {len(graph)} modules under {PACKAGE_DIR}"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(
        "  " + " -> ".join(cycle) for cycle in cycles
    )


def test_package_graph_collapses_subpackages():
    graph = {"p.a.x": {"p.b.y", "p.a.z"}, "p.a.z": set(), "p.b.y": {"p.top"}, "p.top": {"p.a.z"}}
    assert package_graph(graph) == {"p.a": {"p.b"}, "p.b": {"p.top"}, "p.top": {"p.a"}}
    assert find_cycles(package_graph(graph)) == [["p.a", "p.b", "p.top", "p.a"]]


def test_subpackages_have_no_import_cycles():
    """E.g. ``eval`` importing ``sampling`` while ``sampling`` imports ``eval`` is a cycle here even
    when no two modules import each other."""
    units = package_graph(import_graph())
    assert len(units) > 10, f"found only {len(units)} subpackages and top-level modules under {PACKAGE_DIR}"
    cycles = find_cycles(units)
    assert not cycles, "import cycles between subpackages (top-level modules count alone):\n" + "\n".join(
        "  " + " -> ".join(cycle) for cycle in cycles
    )


def hits_by_module(find: Callable[[Path], list[str]]) -> dict[str, list[str]]:
    """``{module file: find(file)}`` over the package's files, for those where ``find`` reports something."""
    return {
        str(path.relative_to(PACKAGE_DIR.parent)): hits
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
        if (hits := find(path))
    }


def listing(hits: dict[str, list[str]]) -> str:
    """One ``  file:hit`` line per hit."""
    return "\n".join(f"  {path}:{hit}" for path, found in hits.items() for hit in found)


def test_project_imports_sit_at_module_top():
    """An import of our own package inside a function hides a dependency (often a cycle): a module
    that needs its caller is in the wrong place. Third-party imports may stay lazy, with a reason."""
    hidden = hits_by_module(function_level_imports)
    assert not hidden, "project imports inside functions:\n" + listing(hidden)


def private_imports(path: Path) -> list[str]:
    """``line: statement`` of each import of a leading-underscore name from another project module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == PACKAGE)
        and any(alias.name.startswith("_") and not alias.name.startswith("__") for alias in node.names)
    ]


def test_no_private_name_is_imported_across_modules():
    """A leading underscore means "this module's own": a name another module needs is public."""
    found = hits_by_module(private_imports)
    assert not found, "private names imported across modules:\n" + listing(found)
