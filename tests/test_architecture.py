"""The structure drawn from the imports (docs/architecture.md): each floor imports only the floors beneath it, no
circle of files, no source file over 500 lines. Imports inside functions count as much as those at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Bottom to top. A module belongs to the longest name below that its own name starts with.
FLOORS = (
    ("settings", "errors", "logs", "locks", "compat"),
    ("knowledge",),
    ("finetune",),
    ("engine",),
    ("assistant",),  # the conversation logic
    ("assistant.learning",),  # the learning loop: needs the assistant and training both
    ("assistant.ui",),  # the Gradio app
    ("assistant.__main__",),  # the command line, the top
)
PACKAGES = ("knowledge", "finetune", "engine", "assistant")
TOP_MODULES = ("settings", "errors", "logs", "locks", "compat")
MAX_LINES = 500


def project_modules() -> dict[str, Path]:
    modules = {}
    for path in [*(ROOT / f"{m}.py" for m in TOP_MODULES), *(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))]:
        if path.is_file():
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports, wherever in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def floor(module: str) -> int:
    matches = [(len(name), level) for level, names in enumerate(FLOORS) for name in names
               if module == name or module.startswith(name + ".")]
    return max(matches)[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports(path, set(modules)) - {name} for name, path in modules.items()}


def test_every_import_points_down(graph):
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if floor(b) > floor(a))
    assert not upward


def test_no_circle_of_files(graph):
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not circles


def test_only_the_app_imports_gradio():
    # compat.py wraps the Gradio internals the app uses (and only the app calls those wrappers)
    gradio_users = sorted(name for name, path in project_modules().items()
                          if "gradio" in {n.split(".")[0] for n in _imported_names(path)}
                          and not name.startswith("assistant.ui") and name != "compat")
    assert not gradio_users


def test_no_source_file_is_over_500_lines():
    long = {name: n for name, path in project_modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names
