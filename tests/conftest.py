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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A really trained (tiny: 64 px, two epochs) EfficientNetB3 run folder on synthetic cells.

    Shared by the end-to-end and conversion tests; needs TensorFlow.
    """
    pytest.importorskip("tensorflow")
    from training.synth import write_cell_dataset
    from training.train import TrainOptions, run_training

    root = tmp_path_factory.mktemp("tiny_run")
    data = root / "cells"
    cells = write_cell_dataset(data, n_subjects=8, cells_per_subject=10, size=96, seed=1, stain_spread=0.3)
    # With the images' pixel size, so the bundle carries crop_um and the device crops at the trained scale.
    opts = TrainOptions(
        input_size=64, um_per_px=cells["um_per_px"], epochs=2, batch_size=16, weights="none", bn_momentum=0.9, seed=1
    )
    metrics = run_training(data, root / "run", opts, progress=False)
    return root, data, metrics


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """A small CNN with the same head, trained until it discriminates (seconds), for the conversion gate tests.

    The cells share one house stain (stain_spread 0): with the full range of stains, ten subjects are too few
    for a seconds-long training to learn the morphology rather than each subject's stain, and the default
    gate's test needs a model whose probabilities stand clear of the threshold."""
    pytest.importorskip("tensorflow")
    from training.synth import write_cell_dataset
    from training.train import TrainOptions, run_training

    root = tmp_path_factory.mktemp("small_run")
    data = root / "cells"
    cells = write_cell_dataset(data, n_subjects=10, cells_per_subject=16, size=96, seed=2, stain_spread=0.0)
    opts = TrainOptions(
        input_size=64,
        um_per_px=cells["um_per_px"],
        epochs=25,
        batch_size=16,
        backbone="smallcnn",
        weights="none",
        learning_rate=3e-3,
        patience=25,
        seed=2,
    )
    metrics = run_training(data, root / "run", opts, progress=False)
    return root, data, metrics


@pytest.fixture(scope="session")
def physical_classifier(demo_bundle_dir):
    """The demo model behind a contract that crops 20.25 µm around each cell, as a retrained bundle does
    (the synthetic cells' training scale, docs/scale.md)."""
    from device.bundle import load_bundle
    from device.classifier import Classifier

    bundle = load_bundle(demo_bundle_dir)
    bundle = dataclasses.replace(bundle, contract=dataclasses.replace(bundle.contract, crop_um=20.25))
    with Classifier(bundle, threads=1) as clf:
        yield clf
