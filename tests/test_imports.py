"""The import graph: the store never imports the training side, the CLI or the benchmarks; no cycles.

Every import statement counts, at module level and inside functions alike
(a function-local import that dodges a cycle is still a cycle in the
design). Read from the source with ``ast``: nothing is imported here.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "shardps"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """Module -> the project modules (shardps.*, benchmarks.*) it imports anywhere in its source."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files) | {_module_name(p) for p in (ROOT / "benchmarks").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from a.b import c`: the module a.b.c if there is one, else a.b itself
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                           for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t.split(".")[0] in ("shardps", "benchmarks") and t != name)
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the modules of ``graph``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt in graph and nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_store_never_imports_the_training_side_the_cli_or_benchmarks():
    graph = _graph()
    store = {m for m in graph if m.startswith("shardps.store")}
    assert len(store) > 10  # the walk found the package
    forbidden = ("shardps.training", "shardps.cli", "benchmarks")
    bad = {m: sorted(t for t in graph[m] if t.startswith(forbidden)) for m in store}
    assert not {m: t for m, t in bad.items() if t}


def test_the_library_never_imports_the_benchmarks():
    graph = _graph()
    assert not {m: sorted(t) for m, t in graph.items() if any(x.startswith("benchmarks") for x in t)}


def test_there_is_no_import_cycle_not_even_through_a_function_local_import():
    assert _cycle(_graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
