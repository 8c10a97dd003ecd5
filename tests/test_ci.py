"""CI type-checks the package: the README's test block (which `.ci/run` runs) calls mypy
before the tests, and mypy's settings say what it checks."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ci_block(name: str) -> str:
    """The commands of the README's ``<!-- ci:NAME -->`` block, as `.ci/run` reads them."""
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"^<!-- ci:{name} -->\n```\w*\n(.*?)^```", text, re.M | re.S)
    assert found, f"README lacks the ci:{name} block"
    return found.group(1)


def test_ci_runs_mypy_before_the_tests():
    commands = [c.strip() for c in _ci_block("test").split("&&")]
    assert ".venv/bin/python -m mypy" in commands
    assert commands.index(".venv/bin/python -m mypy") < commands.index(
        ".venv/bin/python -m pytest")


def test_mypy_with_no_arguments_checks_the_package_with_the_pydantic_plugin():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mypy = project["tool"]["mypy"]
    assert mypy["files"] == ["pipeline"]
    assert "pydantic.mypy" in mypy["plugins"]
    dev = project["project"]["optional-dependencies"]["dev"]
    assert any(re.match(r"mypy\b", dep) for dep in dev)
