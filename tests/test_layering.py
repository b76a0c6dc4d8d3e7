"""The house's floors hold: imports only point down, and no import hides inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmscalpel"
# The CLI imports its commands' dependencies lazily so that `lmscalpel --help` starts fast; it is
# the top floor, so nothing it imports late can be a cycle.
LAZY_ALLOWED = {"cli"}


def _late_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            guarded = isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            if isinstance(child, ast.ImportFrom) and (inside or guarded_scope[-1]):
                module = "." * child.level + (child.module or "")
                if child.level or module.split(".")[0] == "lmscalpel":
                    found.append(f"{path.relative_to(SRC.parent)}:{child.lineno} {module}")
            elif isinstance(child, ast.Import) and (inside or guarded_scope[-1]):
                found.extend(
                    f"{path.relative_to(SRC.parent)}:{child.lineno} {alias.name}"
                    for alias in child.names
                    if alias.name.split(".")[0] == "lmscalpel"
                )
            guarded_scope.append(guarded or guarded_scope[-1])
            visit(child, nested)
            guarded_scope.pop()

    guarded_scope = [False]
    visit(tree, False)
    return found


def test_no_late_or_type_checking_imports_of_lmscalpel():
    """A late import (inside a function) or a TYPE_CHECKING one hides a cycle instead of removing
    it; only the CLI may import lazily."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).parts[0] in LAZY_ALLOWED:
            continue
        offenders.extend(_late_imports(path))
    assert offenders == []


def test_the_detector_finds_late_and_guarded_imports(tmp_path, monkeypatch):
    """The check above can fail: it sees imports in functions and under TYPE_CHECKING, and
    ignores module-level and non-lmscalpel ones."""
    fake = tmp_path / "lmscalpel" / "x.py"
    fake.parent.mkdir()
    fake.write_text(
        "from typing import TYPE_CHECKING\n"
        "import json\nfrom lmscalpel.core import paths\n"
        "if TYPE_CHECKING:\n    from lmscalpel.patch import Patch\n"
        "def f():\n    from lmscalpel.methods import get_editor\n    import json\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake.parent)
    found = _late_imports(fake)
    assert [f.split(" ")[1] for f in found] == ["lmscalpel.patch", "lmscalpel.methods"]


def test_import_contract_holds():
    """The layers contract in pyproject.toml (run by `make lint` too)."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed in this environment")
    done = subprocess.run(
        [str(lint)], cwd=SRC.parents[1], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:]
