"""The package's layout rules (CONTRIBUTING.md): no import circle between its modules, and
no module imports an underscore name from a module outside its own (sub)package; plus the
file sizes a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "arcface_rs"
# the compiled core: every layer reads it, by design
SHARED_PRIVATE = {"_core"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str]]:
    """(module imported from, name imported) for every module-level import inside the
    package (imports inside functions run late and cannot make a circle at import)."""
    package = _package_of(name, path)
    found = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found.append((source, alias.name))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("arcface_rs"):
            found += [(node.module, alias.name) for alias in node.names]
    return found


def test_no_import_circle():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for source, imported in _imports(name, path, modules):
            full = f"{source}.{imported}"
            if imported not in SHARED_PRIVATE:  # the compiled core imports nothing back
                targets.add(full if full in modules else source)
        graph[name] = {t for t in targets if t in modules and t != name}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(trail + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_no_underscore_name_crosses_a_package_boundary():
    modules = _modules()
    crossings = []
    for name, path in modules.items():
        package = _package_of(name, path)
        for source, imported in _imports(name, path, modules):
            source_package = (
                source
                if f"{source}.{imported}" in modules
                else (
                    source
                    if source in modules and modules[source].name == "__init__.py"
                    else source.rpartition(".")[0]
                )
            )
            if imported.startswith("_") and imported not in SHARED_PRIVATE:
                if source_package != package and f"{source}.{imported}" not in modules:
                    crossings.append(f"{name}: from {source} import {imported}")
    assert not crossings, crossings


def test_modules_stay_readable():
    # no Python module over ~450 lines (CONTRIBUTING.md: split by concept instead)
    long = {
        p.name: n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450
    }
    assert not long, long


def test_rust_files_stay_readable():
    # no Rust file over ~900 lines (CONTRIBUTING.md: a folder of parts instead, tests apart)
    src = PACKAGE.parents[1] / "src"
    long = {
        str(p.relative_to(src)): n
        for p in src.rglob("*.rs")
        if (n := len(p.read_text().splitlines())) > 900
    }
    assert not long, long
