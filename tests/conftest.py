"""Shared fixtures: the shipped demo bundle and configs that write into tmp_path."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from device.config import DEMO_BUNDLE, DEMO_FIELDS, Config, ServiceConfig, StoreConfig

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def demo_bundle_dir() -> Path:
    assert (DEMO_BUNDLE / "model.json").is_file(), "the shipped demo bundle is missing: run `make demo-model`"
    return DEMO_BUNDLE


@pytest.fixture(scope="session")
def demo_fields_dir() -> Path:
    assert any(DEMO_FIELDS.glob("*.jpg")), "the shipped sample fields are missing: run `make demo-model`"
    return DEMO_FIELDS


@pytest.fixture
def config(tmp_path) -> Config:
    """The embedded default, but storing under tmp_path and taking no start-up captures."""
    cfg = Config()
    cfg = dataclasses.replace(
        cfg,
        store=dataclasses.replace(StoreConfig(), data_dir=str(tmp_path / "store"), min_free_mb=1),
        service=ServiceConfig(startup_captures=0),
        model=dataclasses.replace(cfg.model, threads=1),
    )
    cfg.validate()
    return cfg
