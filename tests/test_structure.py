"""The package's import graph: dependencies point one way (no cycle, counting imports inside functions,
which only defer one), and no module reaches into another's private names."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """deepspec module -> deepspec modules it imports (anywhere in the file); and (module, private name) pairs
    imported from another module."""
    files = {}
    for f in (ROOT / "deepspec").rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    edges: dict[str, set[str]] = {m: set() for m in files}
    private: list[tuple[str, str]] = []
    for mod, f in files.items():
        package = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or node.level):
                source = node.module or ""
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([source] if source else []))
                if not source.startswith("deepspec"):
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    target = sub if sub in files else source
                    if target in files and target != mod:
                        edges[mod].add(target)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append((mod, f"{source}.{alias.name}"))
            elif isinstance(node, ast.Import):
                edges[mod] |= {a.name for a in node.names if a.name in files and a.name != mod}
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    edges, _ = import_graph()
    assert len(edges) > 40 and "deepspec.decoding.cost" in edges["deepspec.drafters"]  # the graph was read
    assert cycles(edges) == []


def test_the_cycle_finder_finds_one():
    """Negative control: a proposer importing the benchmark layer, which imports the runner, which builds
    proposers, is reported."""
    edges, _ = import_graph()
    edges["deepspec.drafters"] = edges["deepspec.drafters"] | {"deepspec.evaluation.bench"}
    assert ["deepspec.drafters", "deepspec.evaluation.bench", "deepspec.evaluation.runner"] in cycles(edges)


def test_no_private_imports_across_modules():
    _, private = import_graph()
    assert private == []
