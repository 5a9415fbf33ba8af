"""Per-cell classification, thresholds, review band and CAM heatmaps with the LiteRT runtime."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from device.bundle import load_bundle
from device.classifier import Classifier, class_heatmap
from device.heatmap import colorize, overlay


@pytest.fixture(scope="module")
def clf(demo_bundle_dir):
    with Classifier(load_bundle(demo_bundle_dir), threads=1) as c:
        yield c


def test_golden_crops_reproduce_recorded_outputs(clf):
    g = clf.bundle.golden
    out = clf.raw(g.crops)
    np.testing.assert_allclose(out["probability"], g.probabilities, atol=g.tolerance)
    assert out["cam"].shape[1:] == tuple(clf.bundle.meta["cam"]["shape"])


def test_batch_and_single_calls_agree(clf):
    crops = clf.bundle.golden.crops
    batched = [p.probability for p in clf.classify(crops, batch_size=len(crops))]
    single = [clf.classify(c[None])[0].probability for c in crops]
    np.testing.assert_allclose(batched, single, atol=1e-6)


def test_labels_follow_threshold_and_review_band(clf):
    low, high = clf.bundle.review_band
    for p in clf.classify(clf.bundle.golden.crops):
        assert 0.0 <= p.probability <= 1.0
        assert p.positive == (p.probability >= clf.bundle.threshold)
        assert p.label == clf.bundle.labels[1 if p.positive else 0]
        assert p.needs_review == (low <= p.probability <= high)


def test_demo_model_discriminates(clf):
    # The golden crops are stratified held-out synthetic cells; the demo model must get most of them right.
    g = clf.bundle.golden
    meta = clf.bundle.meta
    assert meta["verification"]["quantized_metrics"]["accuracy"]["value"] >= 0.8
    preds = clf.classify(g.crops)
    assert len({p.label for p in preds}) == 2, "the demo model should not give one label to every cell"


def test_heatmap_is_relu_of_signed_cam_for_the_predicted_class():
    cam = np.array([[2.0, -1.0], [0.0, -4.0]], dtype=np.float32)
    np.testing.assert_allclose(class_heatmap(cam, positive=True), [[1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(class_heatmap(cam, positive=False), [[0.0, 0.25], [0.0, 1.0]])
    assert class_heatmap(np.zeros((2, 2)), True).max() == 0.0


def test_overlay_is_rgb_and_red_where_hot():
    crop = np.full((64, 64, 3), 128, dtype=np.uint8)
    cam = np.zeros((4, 4), dtype=np.float32)
    cam[0, 0] = 1.0
    out = overlay(crop, cam, alpha=1.0)
    assert out.shape == crop.shape and out.dtype == np.uint8
    # JET maps 1.0 to red: applyColorMap's BGR must have been converted to RGB.
    hot = colorize(np.ones((1, 1)))[0, 0]
    assert hot[0] > 100 and hot[2] < 50
    assert out[0, 0, 0] > out[0, 0, 2]
    assert out[-1, -1, 2] > out[-1, -1, 0]  # cold corner is blue


def test_bad_crops_are_rejected(clf):
    size = clf.input_size
    with pytest.raises(ValueError, match="uint8"):
        clf.raw(np.zeros((1, size, size, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="expected"):
        clf.raw(np.zeros((1, size + 1, size, 3), dtype=np.uint8))
    assert clf.classify(np.zeros((0, size, size, 3), dtype=np.uint8)) == []


def test_prediction_is_frozen(clf):
    p = clf.classify(clf.bundle.golden.crops[:1])[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.probability = 0.5
