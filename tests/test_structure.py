"""The package's import graph: dependencies point one way (no cycle, counting imports inside functions,
which only defer one), and no module reaches into another's private names."""

import ast
import re
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
    assert len(edges) > 40 and "deepspec.decoding.cost" in edges["deepspec.drafters.block"]  # the graph was read
    assert cycles(edges) == []


def test_the_cycle_finder_finds_one():
    """Negative control: a proposer importing the benchmark layer, which imports the runner, which builds
    proposers, is reported."""
    edges, _ = import_graph()
    edges["deepspec.drafters.build"] = edges["deepspec.drafters.build"] | {"deepspec.evaluation.bench"}
    assert ["deepspec.drafters.build", "deepspec.evaluation.bench", "deepspec.evaluation.runner"] in cycles(edges)


def test_no_private_imports_across_modules():
    _, private = import_graph()
    assert private == []


def kind_switches(source: str, kinds: set[str]) -> list[int]:
    """Lines comparing something with a drafter or method kind's name (`x == "eagle3"`, `k in ("dflash", …)`)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                names = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                if any(isinstance(n, ast.Constant) and n.value in kinds for n in names):
                    lines.append(node.lineno)
                    break
    return lines


def test_no_kind_switch_outside_drafters():
    """Every trained kind is asked through its registry entry: no module outside deepspec/drafters/ compares
    against a kind's name (negative control: the switch the trainer once held is found)."""
    from deepspec.drafters.registry import KINDS

    kinds = set(KINDS) | {kind.method.model_fields["kind"].annotation.__args__[0] for kind in KINDS.values()}
    assert {"eagle3", "dflash", "dspark", "block"} <= kinds
    assert kind_switches('steps = dc.ttt_length if dc.kind == "eagle3" else model.drafts', kinds) == [1]
    assert kind_switches('if m.kind in ("eagle3", "block"):\n    pass', kinds) == [1]
    found = {str(f.relative_to(ROOT)): kind_switches(f.read_text(), kinds) for f in (ROOT / "deepspec").rglob("*.py")
             if "drafters" not in f.relative_to(ROOT).parts}
    assert {f: lines for f, lines in found.items() if lines} == {}
    # The workflow's rules (Snakemake's Python dialect, which ast cannot read): no `.kind` compared either.
    switch = re.compile(r"\.kind\s*(==|!=|in\b|not in\b)")
    assert switch.search('    if m.kind not in ("eagle3", "block"):')
    rules = [ROOT / "Snakefile", *(ROOT / "workflow" / "rules").glob("*.smk")]
    assert [f"{f.name}:{i + 1}" for f in rules for i, line in enumerate(f.read_text().splitlines())
            if switch.search(line)] == []


def test_every_package_is_installed():
    """pyproject lists its packages by name (kernels/ is mapped to deepspec.kernels), so a package left off
    the list would be missing from a wheel while an editable install still finds it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(f.parent.relative_to(ROOT).parts) for f in (ROOT / "deepspec").rglob("__init__.py")}
    assert listed == found | {"deepspec.kernels"}
