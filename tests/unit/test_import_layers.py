"""Imports flow down: no circle among codistill's modules, and no import against the layer order written in
docs/design.md ("Imports flow one way"). Counts module-level and function-level imports, not `if TYPE_CHECKING:`
ones (annotations only). `codistill/__init__.py` (the public API, loaded on first use) sits on top."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "codistill"


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _nodes(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for branch in node.orelse:
                yield branch
                yield from _nodes(branch)
            continue
        yield node
        yield from _nodes(node)


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        for node in _nodes(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                while target not in mods and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in mods and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def design_layers() -> list[set[str]]:
    text = (ROOT / "docs" / "design.md").read_text()
    order = re.search(r"Imports flow one way: `([^`]+)`", text)
    assert order, "docs/design.md states the layer order"
    flat = re.sub(r"\s+", " ", order.group(1))
    layers = []
    for group in flat.split("->"):
        group = re.sub(r"^\s*\w+\s*\(([^)]*)\)\s*$", r"\1", group)  # `base (errors, registry, ...)`
        layers.append({n.strip() for n in group.split(",") if n.strip()})
    return layers


def test_no_import_circle():
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                circles.append(sorted(part))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == []


def test_imports_follow_the_layer_order_of_the_design():
    layers = design_layers()

    def layer(module: str) -> int:
        top = module.split(".")[1] if "." in module else "codistill"
        if top == "codistill":
            return -1  # the public API, on top
        found = [i for i, names in enumerate(layers) if top in names or f"{top}.py" in names]
        assert found, f"{module}: its area {top} is in no layer of docs/design.md's import order"
        return found[0]

    upward = [f"{m} -> {d}" for m, deps in import_graph().items() for d in deps if layer(d) < layer(m)]
    assert upward == []


def test_the_checks_see_an_upward_import(tmp_path):
    """The scan finds imports inside functions, and not those under TYPE_CHECKING."""
    tree = ast.parse("def f():\n    import codistill.api\nif TYPE_CHECKING:\n    import codistill.run\n")
    names = [a.name for n in _nodes(tree) if isinstance(n, ast.Import) for a in n.names]
    assert names == ["codistill.api"]
