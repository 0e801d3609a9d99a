"""The packages' dependencies point one way: fl_tools -> fl_server, fl_client -> common (the server and
the client share only common). The installed package holds only these four (not tests/ nor bench/), and
its commands are where pyproject.toml says."""
import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOT_INSTALLED = {"tests", "bench"}
FORBIDDEN = {  # package -> the top-level packages its modules must not import
    "common": {"fl_server", "fl_client", "fl_tools", *NOT_INSTALLED},
    "fl_server": {"fl_client", "fl_tools", *NOT_INSTALLED},
    "fl_client": {"fl_server", "fl_tools", *NOT_INSTALLED},
    "fl_tools": NOT_INSTALLED,
}


def imported_packages(path: Path) -> set[str]:
    """The top-level package of every import in the module, those inside functions too."""
    package = path.relative_to(ROOT).parent.parts
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(".".join(package[:len(package) - node.level + 1]) if node.level else node.module or "")
    return {name.split(".")[0] for name in names}


def sources() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for package in FORBIDDEN for p in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", sources())
def test_imports_point_one_way(path):
    forbidden = FORBIDDEN[path.split("/")[0]] & imported_packages(ROOT / path)
    assert not forbidden, f"{path} imports {sorted(forbidden)}"


def test_the_check_sees_imports_inside_functions():
    module = ROOT / "fl_tools" / "anomaly.py"  # imports the simulation only in `example`
    assert "fl_tools" in imported_packages(module)


def module_imports(path: Path) -> set[str]:
    """The project modules a module imports when it is loaded (module level, not under TYPE_CHECKING
    nor inside functions): the edges along which an import cycle would break loading."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_no_import_cycle():
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for package in FORBIDDEN for p in (ROOT / package).rglob("*.py") if "proto" not in p.parts}
    graph = {name: {m for m in module_imports(path) if m in modules and m != name} for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for nxt in sorted(graph[name]):
            assert state.get(nxt) != "open", "import cycle: " + " -> ".join([*trail, name, nxt])
            if nxt not in state:
                visit(nxt, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def scripts() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[)", text, re.MULTILINE | re.DOTALL)
    assert section is not None
    return dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', section.group(1), re.MULTILINE))


def test_every_command_names_a_function_of_an_installed_package():
    packages = re.search(r"^packages = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert packages is not None
    installed = set(re.findall(r'"([\w.]+)"', packages.group(1)))
    assert installed >= {p.parent.relative_to(ROOT).as_posix().replace("/", ".")
                         for package in FORBIDDEN for p in (ROOT / package).rglob("__init__.py")}
    commands = scripts()
    assert {"fl-server", "fl-client", "fl-demo", "fl-experiment", "fl-anomaly"} <= set(commands)
    for name, target in commands.items():
        module, function = target.split(":")
        assert module.rpartition(".")[0] in installed, name
        assert callable(getattr(importlib.import_module(module), function)), name
