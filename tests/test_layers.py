"""The import graph of offsite_ds/ (and kernels/, imported as offsite_ds.kernels.*) points one way.

The layers are the README's table (its one home): every module sits in one layer, imports nothing from a
higher one, and no import cycle exists - function-local imports count, since they run just the same.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "offsite_ds"


def modules() -> dict[str, Path]:
    """Dotted module name -> source file, for the package and the kernel sources it extends its path to."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        found[f"{PACKAGE}.kernels.{path.stem}"] = path
    return found


def layer_table(readme: str | None = None) -> dict[str, tuple[int, str]]:
    """The README's layers table: module name under offsite_ds. -> (layer number, layer name)."""
    text = readme if readme is not None else (ROOT / "README.md").read_text()
    section = text.split("### Layers: imports point down", 1)[1]
    table: dict[str, tuple[int, str]] = {}
    for line in section.splitlines():
        row = re.match(r"\|\s*(\d+)\s+(\w+)\s*\|([^|]*)\|", line)
        if row:
            for name in re.findall(r"`([\w.]+)`", row.group(3)):
                assert name not in table, f"{name} is in two layers of the README's table"
                table[name] = (int(row.group(1)), row.group(2))
    return table


def layer_of(module: str, table: dict[str, tuple[int, str]]) -> tuple[int, str] | None:
    """The most specific table entry that names the module or a package above it."""
    name = module[len(PACKAGE) + 1:] if module != PACKAGE else "__init__"
    while name:
        if name in table:
            return table[name]
        name = name.rpartition(".")[0]
    return None


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `module` imports anywhere in its file (the nearest known module of each name)."""
    def nearest(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - (0 if is_package else 1) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from a import b` imports the module a.b when there is one, else names from a
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for name in names:
            target = nearest(name) if name.startswith(PACKAGE) else None
            if target and target != module:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {m: imports(m, p, set(found)) for m, p in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    result.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return result


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_every_module_has_a_layer_and_imports_point_down():
    table = layer_table()
    edges = graph()
    unplaced = sorted(m for m in edges if layer_of(m, table) is None)
    assert not unplaced, f"modules missing from the README's layers table: {unplaced}"
    upward = sorted(f"{m} ({layer_of(m, table)[1]}) imports {d} ({layer_of(d, table)[1]})"
                    for m, deps in edges.items() for d in deps if layer_of(d, table)[0] > layer_of(m, table)[0])
    assert not upward, "imports from a lower layer into a higher one:\n" + "\n".join(upward)


def test_every_table_entry_is_a_module():
    known = modules()
    stale = [name for name in layer_table() if f"{PACKAGE}.{name}" not in known and name != "__init__"]
    assert not stale, f"the README's layers table names modules that do not exist: {stale}"


def test_the_checks_catch_a_cycle_an_upward_import_and_a_local_import(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from offsite_ds.cli import main\n    from offsite_ds import errors\n")
    known = {"offsite_ds", "offsite_ds.cli", "offsite_ds.errors", "offsite_ds.m"}
    assert imports("offsite_ds.m", source, known) == {"offsite_ds.cli", "offsite_ds.errors"}
    table = layer_table("### Layers: imports point down\n| 0 core | `errors`, `m` | x |\n| 5 interface | `cli` | y |\n")
    assert layer_of("offsite_ds.m", table) == (0, "core") and layer_of("offsite_ds.cli.tune", table) == (5, "interface")
    with pytest.raises(AssertionError, match="two layers"):
        layer_table("### Layers: imports point down\n| 0 core | `m` | x |\n| 1 platform | `m` | y |\n")
