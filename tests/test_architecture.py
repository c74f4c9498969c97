"""The package's import graph runs one way: no module imports (even lazily, inside a function, or
through a package's __init__) a module that imports it back, directly or through others."""

import ast
import re
from pathlib import Path

import maisi2

PACKAGE = Path(maisi2.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = ("maisi2",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The maisi2 modules `path` imports anywhere in its body (a package counts as its __init__)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from maisi2 import x` imports the module maisi2.x when there is one
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            # importing maisi2.a.b runs maisi2/a/__init__.py first: that is an import too
            parts = name.split(".")
            found.update(".".join(parts[:k]) for k in range(2, len(parts) + 1) if ".".join(parts[:k]) in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path, set(paths)) - {name} for name, path in paths.items()}
    # A package's own __init__ re-exports its modules; the package itself is not a cycle with them.
    for name in graph:
        graph[name] = {m for m in graph[name] if not (name.startswith(m + ".") and m in paths)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_import_graph_is_acyclic():
    graph = import_graph()
    assert "maisi2.generate" in graph and "maisi2.autoencoder.decoding" in graph  # the walk saw the package
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_no_sys_path_edits_outside_the_tests_conftest():
    """Shared code lives in the package or one helper module imported normally, never reached by
    editing sys.path (tests/conftest.py alone puts experiments/ on it for the tests)."""
    root = PACKAGE.parents[1]
    edits = [str(path.relative_to(root)) for folder in ("src", "tests", "experiments", "benchmarks")
             for path in (root / folder).rglob("*.py")
             if path != root / "tests" / "conftest.py" and re.search(r"sys\.path\.(insert|append|extend)|sys\.path\s*=",
                                                                    path.read_text())]
    assert edits == []
