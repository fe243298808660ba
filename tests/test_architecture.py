"""The shape of the tree, checked from the source: no import circles, no mixin daemon, no huge modules.

The import graph is read from the AST of `dallm/`, `daemon/` and `tui/` with the install mapping applied
(`daemon/` is `dallm.daemon`, `tui/` is `dallm.tui`; see pyproject's package-dir), and it includes the
imports inside functions (lazy imports hide circles from tools that only read the top of a file) and
`if TYPE_CHECKING:` imports: a circle hidden behind a type-only import is still two modules that each
need the other to be understood.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"dallm": "dallm", "daemon": "dallm.daemon", "tui": "dallm.tui"}
MAX_LINES = 500


def module_files() -> dict[str, Path]:
    """Every module's dotted name (as installed) -> its file."""
    modules: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _imported(module: str, path: Path, modules: dict[str, Path]) -> Iterator[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    yield f"{base}.{alias.name}"
                elif base in modules:
                    yield base


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {m: {t for t in _imported(m, p, modules) if t != m} for m, p in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_circle_finder_finds_a_planted_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_imports_and_the_install_mapping() -> None:
    graph = import_graph()
    assert "dallm.daemon.server" in graph and "dallm.tui.app" in graph
    # dallm/cli/__init__.py imports the daemon's client library inside functions only
    assert any(t.startswith("dallm.") for t in graph["dallm.cli"])


def test_no_import_circles() -> None:
    found = circles(import_graph())
    assert found == [], "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_library_never_imports_the_daemon_or_the_tui() -> None:
    graph = import_graph()
    wrong = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        if not m.startswith(("dallm.daemon", "dallm.tui", "dallm.testing"))
        for t in targets
        if t.startswith(("dallm.daemon", "dallm.tui"))
        and not m.startswith("dallm.cli")  # the CLI starts the daemon and the TUI by name
    )
    assert wrong == []


def test_the_monitor_is_pure() -> None:
    """CS, CS-Fluctuation, the turning point and early stop: no transport, storage or presentation."""
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith("dallm.monitor"):
            assert all(t.startswith(("dallm.monitor", "dallm.config")) for t in targets), (module, targets)


def test_no_module_over_500_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in module_files().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_no_class_is_assembled_from_mixins_in_the_daemon() -> None:
    for module, path in module_files().items():
        if not module.startswith("dallm.daemon"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name == "Daemon":
                assert node.bases == [], f"{path}: Daemon has bases {[ast.unparse(b) for b in node.bases]}"


def test_one_class_per_name() -> None:
    seen: dict[str, list[str]] = {}
    for module, path in module_files().items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                seen.setdefault(node.name, []).append(module)
    assert {name: where for name, where in seen.items() if len(where) > 1} == {}


def test_every_package_is_listed_for_installation() -> None:
    """pyproject lists packages by hand (the package-dir mapping); a new subpackage left out installs
    with an editable checkout but is missing from a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {m for m, p in module_files().items() if p.name == "__init__.py"}
    assert packages - listed == set()
