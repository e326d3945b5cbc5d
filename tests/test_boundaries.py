"""The one-way package boundaries: utils <- memflow <- pipeline <- trainer <- tiny <- experiments.

Each package may import only the packages to its left; the product (the first four) never imports
MemFlow-Tiny or the experiments. Imports are read from the source, so a lazy import inside a function
counts too.
"""

import ast
from pathlib import Path

import pytest

from .conftest import ROOT

ORDER = ("utils", "memflow", "pipeline", "trainer", "tiny", "experiments")


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", ORDER)
def test_a_package_imports_only_the_packages_before_it(package):
    forbidden = set(ORDER[ORDER.index(package) + 1 :])
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & forbidden)
        for path in sorted((ROOT / package).rglob("*.py"))
        if imported_packages(path) & forbidden
    }
    assert not offenders, f"{package} must not import {sorted(forbidden)}: {offenders}"


def test_the_checker_sees_lazy_imports(tmp_path):
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    from tiny.world import COLOURS\n    import experiments.probe_teacher\n")
    assert imported_packages(source) == {"tiny", "experiments"}
