"""The package metadata points at files that exist, and the code's layering holds."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_data_pattern_matches_a_file():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    for package, patterns in meta["tool"]["setuptools"]["package-data"].items():
        for pattern in patterns:
            assert list((REPO / package).glob(pattern)), f"package-data {package}: {pattern!r} matches no file"


def test_errors_module_has_no_command_line_dependency():
    import ast

    tree = ast.parse((REPO / "device" / "errors.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "click" not in imported
