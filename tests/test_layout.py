"""The code's layout: no import cycle among flows/ and tasks/, and the README's table names every module.

The import graph is read from the source (every ``import`` and ``from ... import``, those inside
functions included), not from what Python happened to import, so a lazy import cannot hide a cycle.
"""

# Standard library imports
import ast
import re
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "tasks")


def _modules() -> Dict[str, Path]:
    """Every module of flows/ and tasks/, by dotted name (packages by their own name)."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(path: Path, known: Set[str]) -> Set[str]:
    """The modules of ``known`` that a file imports, anywhere in it."""
    names: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # ``from tasks.x import module``
    return {name for name in names if name in known and not _is_package(name, known)}


def _is_package(name: str, known: Set[str]) -> bool:
    return any(other.startswith(name + ".") for other in known)


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every cycle's path found by a depth-first walk (empty when the graph has none)."""
    found: List[List[str]] = []
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_lazy_import_cycle(tmp_path: Path) -> None:
    first = tmp_path / "first.py"
    first.write_text("import second\n")
    second = tmp_path / "second.py"
    second.write_text("def later():\n    from first import thing\n")
    known = {"first", "second"}
    graph = {"first": _imports(first, known), "second": _imports(second, known)}
    assert _cycles(graph) == [["first", "second", "first"]]


def test_no_import_cycle_among_flows_and_tasks() -> None:
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(path, known) - {name} for name, path in modules.items() if not _is_package(name, known)}
    assert sum(len(targets) for targets in graph.values()) > 50  # the reader sees the imports at all
    assert _cycles(graph) == []


def test_the_command_line_imports_no_prefect_before_it_starts_the_local_api() -> None:
    # Its module-level imports (and theirs) must stay light: Prefect is imported after the server starts.
    modules = _modules()
    known = set(modules)
    seen: Set[str] = set()
    todo = ["flows.command_line"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse(modules[name].read_text(encoding="utf-8"))
        for node in tree.body:  # module level only
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("prefect", "aiohttp")), f"{name} imports {node.module} at load"
                todo += [module for module in (node.module, *(f"{node.module}.{a.name}" for a in node.names))
                         if module in known and not _is_package(module, known)]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith(("prefect", "aiohttp")), f"{name} imports {alias.name} at load"
    assert "tasks.job.settings" in seen


def test_the_readme_table_names_every_module_once_and_nothing_else() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## How it works", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `((?:flows|tasks)/[\w/]+\.(?:py|lua))` \|", section, re.M)
    on_disk = sorted(str(path.relative_to(ROOT)) for package in PACKAGES for path in (ROOT / package).rglob("*")
                     if path.suffix in (".py", ".lua") and path.name != "__init__.py")
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert sorted(listed) == on_disk


def test_tasks_are_grouped_by_job() -> None:
    flat = sorted(path.name for path in (ROOT / "tasks").glob("*.py") if path.name != "__init__.py")
    assert flat == []
    assert sorted(path.name for path in (ROOT / "flows").glob("*.py") if path.name != "__init__.py") == [
        "command_line.py", "parallel_requests.py", "parallel_requests_shards.py"]
