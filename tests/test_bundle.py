"""The model bundle contract: the shipped bundle is valid; damaged or foreign bundles are refused clearly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from device.bundle import SCHEMA_VERSION, load_bundle, sha256_file
from device.classifier import Classifier
from device.errors import BundleError


@pytest.fixture
def bundle_copy(tmp_path, demo_bundle_dir):
    dst = tmp_path / "bundle"
    shutil.copytree(demo_bundle_dir, dst)
    return dst


def test_shipped_bundle_hash_matches_model_json(demo_bundle_dir):
    meta = json.loads((demo_bundle_dir / "model.json").read_text())
    assert sha256_file(demo_bundle_dir / "model.tflite") == meta["tflite_sha256"]
    assert meta["schema_version"] == SCHEMA_VERSION
    assert meta["synthetic"] is True, "the demo bundle must say it was trained on synthetic data"
    assert (demo_bundle_dir / "model.tflite").stat().st_size <= 15_000_000


def test_shipped_bundle_passes_self_test(demo_bundle_dir):
    bundle = load_bundle(demo_bundle_dir)
    with Classifier(bundle, threads=1) as clf:
        result = clf.self_test()
    assert result.passed, result.message
    assert result.count >= 4


def test_tampered_tflite_is_refused(bundle_copy):
    data = bytearray((bundle_copy / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle_copy / "model.tflite").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 .* does not match"):
        load_bundle(bundle_copy)


def test_wrong_schema_is_refused(bundle_copy):
    meta = json.loads((bundle_copy / "model.json").read_text())
    meta["schema_version"] = SCHEMA_VERSION + 1
    (bundle_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="schema_version"):
        load_bundle(bundle_copy)


def test_missing_files_are_named(bundle_copy, tmp_path):
    (bundle_copy / "golden.npz").unlink()
    with pytest.raises(BundleError, match="golden"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nowhere")
    (bundle_copy / "model.json").write_text("{not json")
    with pytest.raises(BundleError, match="not JSON"):
        load_bundle(bundle_copy)


def test_tampered_golden_is_refused(bundle_copy):
    with np.load(bundle_copy / "golden.npz") as npz:
        arrays = dict(npz)
    arrays["probabilities"] = 1.0 - arrays["probabilities"]
    np.savez_compressed(bundle_copy / "golden.npz", **arrays)
    with pytest.raises(BundleError, match="golden.npz: sha256"):
        load_bundle(bundle_copy)


def test_shape_mismatch_is_refused(bundle_copy):
    meta = json.loads((bundle_copy / "model.json").read_text())
    meta["cam"]["shape"] = [7, 7]
    (bundle_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="CAM output"):
        Classifier(load_bundle(bundle_copy), threads=1)


def test_missing_output_is_refused(bundle_copy):
    meta = json.loads((bundle_copy / "model.json").read_text())
    meta["outputs"]["cam"] = "no_such_output"
    (bundle_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="no_such_output"):
        Classifier(load_bundle(bundle_copy), threads=1)
