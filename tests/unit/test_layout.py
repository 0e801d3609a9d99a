"""The packages' dependencies point one way: fl_tools -> fl_server, fl_client -> common. The installed
package holds only these four (not tests/ nor bench/), and its commands are where pyproject.toml says."""
import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOT_INSTALLED = {"tests", "bench"}
FORBIDDEN = {  # package -> the top-level packages its modules must not import
    "common": {"fl_server", "fl_client", "fl_tools", *NOT_INSTALLED},
    "fl_server": {"fl_tools", *NOT_INSTALLED},
    "fl_client": {"fl_tools", *NOT_INSTALLED},
    "fl_tools": NOT_INSTALLED,
}
# Violations that predate this test and belong to modules being changed elsewhere: they fail loudly
# (strict) once fixed, so that their entry goes too.
KNOWN = {
    "common/config.py": "common/config.py imports fl_server.aggregation to check --aggregator",
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


def sources() -> list:
    paths = sorted(p.relative_to(ROOT).as_posix() for package in FORBIDDEN for p in (ROOT / package).rglob("*.py"))
    return [pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=KNOWN[p])) if p in KNOWN else p
            for p in paths]


@pytest.mark.parametrize("path", sources())
def test_imports_point_one_way(path):
    forbidden = FORBIDDEN[path.split("/")[0]] & imported_packages(ROOT / path)
    assert not forbidden, f"{path} imports {sorted(forbidden)}"


def test_the_check_sees_imports_inside_functions():
    module = ROOT / "fl_tools" / "anomaly.py"  # imports the simulation only in `example`
    assert "fl_tools" in imported_packages(module)


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
