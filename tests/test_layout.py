"""The house rules the layout promises (README, Layout): no import cycle between openjamba's packages and top-level
modules other than model <-> hf (the model's from_pretrained/save_pretrained delegate to the converter, which
builds a model; both imports are inside functions), and no library module imports the command line."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "openjamba"
ALLOWED_CYCLES = [{"openjamba.model", "openjamba.hf"}]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every openjamba module `path` imports, at the top or inside functions; TYPE_CHECKING blocks left out."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree)
                   if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.dump(block.test) for node in ast.walk(block)}
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {target} | {f"{target}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] == "openjamba"}


def unit(module: str) -> str:
    """The package or top-level module a module belongs to: openjamba.train.trainer -> openjamba.train."""
    return ".".join(module.split(".")[:2])


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = unit(module_name(path))
        targets = {unit(name) for name in imported_modules(path)} - {source, "openjamba"}
        graph.setdefault(source, set()).update(targets)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the groups of nodes that reach each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            groups.append(group)

    for node in list(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_import_cycle_between_packages():
    cycles = [group for group in strongly_connected(import_graph()) if len(group) > 1]
    assert [c for c in cycles if c not in ALLOWED_CYCLES] == [], cycles


def test_the_library_never_imports_the_command_line():
    users = sorted(module_name(path) for path in PACKAGE.rglob("*.py")
                   if module_name(path) not in ("openjamba.cli", "openjamba.__main__")
                   and any(name == "openjamba.cli" or name.startswith("openjamba.cli.")
                           for name in imported_modules(path)))
    assert users == []


def test_the_checks_see_a_cycle_and_a_cli_import():
    """The oracle of the two tests above: a made-up cycle is found, and this tree's real edges are seen."""
    assert {"a", "b"} in strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}})
    graph = import_graph()
    assert "openjamba.synthetic" in graph["openjamba.train"] and "openjamba.train" in graph["openjamba.cli"]
    assert "openjamba.cli" in imported_modules(PACKAGE / "__main__.py")


def test_the_readme_layout_names_every_source_and_test_file():
    """README's Layout is "every file a contributor opens": a new module, kernel source or test file joins it."""
    import fnmatch
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):readme.index("## Correctness")]
    sources = [p for p in PACKAGE.rglob("*") if p.suffix in (".py", ".cpp", ".h") and "__pycache__" not in p.parts]
    missing = [str(p.relative_to(PACKAGE.parent)) for p in sources if p.name not in layout]
    named = re.findall(r"test_[a-z_*]+", layout)
    missing += [p.name for p in (PACKAGE.parent / "tests").glob("test_*.py")
                if not any(fnmatch.fnmatch(p.stem, name) for name in named)]
    assert not missing, f"README's Layout does not name {missing}"
