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
