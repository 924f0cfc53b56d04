"""Package layout and the dependency direction data <- evaluation <- training."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the dialogrl portions it must not import
FORBIDDEN = {"data": ("dialogrl.evaluation", "dialogrl.training"), "evaluation": ("dialogrl.training",)}


def test_three_portions_import_as_one_namespace():
    for name in ("dialogrl.data", "dialogrl.evaluation", "dialogrl.training"):
        module = importlib.import_module(name)
        assert Path(module.__file__).parent == ROOT / name.split(".")[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_dependency_direction(folder):
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for name in imported_modules(path)
        if name.startswith(FORBIDDEN[folder])
    ]
    assert not offenders, offenders


def test_no_relative_imports_across_portions():
    for path in (p for folder in ("data", "evaluation", "training") for p in (ROOT / folder).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path}: relative import reaching outside its folder"


def test_every_code_package_is_listed_for_installation():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        "dialogrl." + ".".join(init.parent.relative_to(ROOT).parts)
        for folder in ("data", "evaluation", "training")
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert on_disk == listed, "pyproject.toml [tool.setuptools] packages must list every package folder"
