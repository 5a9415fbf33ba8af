"""Per-cell classification, thresholds, review band and CAM heatmaps (signed, fixed scale) with LiteRT."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from device.bundle import load_bundle
from device.classifier import Classifier, class_heatmap
from device.heatmap import BLAST_RGB, NORMAL_RGB, evidence_overlay, fixed_cam_scale, upsample_signed


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


def _shift(out: np.ndarray, crop: np.ndarray) -> np.ndarray:
    """How much redder than bluer each pixel of an overlay became (> 0: toward blast-red, < 0: toward blue)."""
    d = out.astype(np.float32) - crop.astype(np.float32)
    return d[..., 0] - d[..., 2]


def test_overlay_is_red_for_blast_blue_for_normal_and_clear_at_zero():
    crop = np.full((64, 64, 3), 128, dtype=np.uint8)
    cam = np.zeros((4, 4), dtype=np.float32)
    cam[0, 0], cam[3, 3] = 5.0, -5.0
    out = evidence_overlay(crop, cam, scale=5.0, max_alpha=1.0)
    assert out.shape == crop.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], BLAST_RGB)  # full evidence for blast: the blast colour
    np.testing.assert_array_equal(out[-1, -1], NORMAL_RGB)  # full evidence for normal: the normal colour
    np.testing.assert_array_equal(out[0, -1], crop[0, -1])  # no evidence: the plain crop
    np.testing.assert_array_equal(evidence_overlay(crop, np.zeros((3, 3)), scale=1.0), crop)
    with pytest.raises(ValueError, match="scale"):
        evidence_overlay(crop, cam, scale=0.0)


def test_overlay_scale_is_fixed_so_weak_evidence_does_not_saturate():
    crop = np.full((96, 96, 3), 128, dtype=np.uint8)
    weak, strong = np.full((3, 3), 1.5, np.float32), np.full((3, 3), 9.0, np.float32)
    w, s = (_shift(evidence_overlay(crop, c, scale=9.0), crop) for c in (weak, strong))
    assert s.min() > 100 and w.max() < s.min() / 4  # strong saturates; weak is a sixth as strong, not full red
    # The old per-cell peak scaling drew both the same: the colour follows |CAM| / scale, not the cell's own peak.
    np.testing.assert_allclose(w.mean() / s.mean(), 1.5 / 9.0, rtol=0.05)


def test_bilinear_upsampling_never_invents_a_sign():
    cam = np.array([[-0.5, -18.0, -1.0], [-2.0, -0.1, -3.0], [-9.0, -0.2, -4.0]], np.float32)
    assert upsample_signed(cam, (96, 96)).max() < 0  # bicubic would overshoot above 0 next to the -18


def test_cam_scale_is_one_per_bundle_from_the_golden_crops(clf):
    g = clf.bundle.golden
    assert clf.cam_scale == pytest.approx(float(np.percentile(np.abs(g.cams), 99)))
    assert clf.cam_scale == pytest.approx(fixed_cam_scale(clf.raw(g.crops)["cam"]), rel=1e-3)  # the runtime agrees
    assert fixed_cam_scale(np.zeros((2, 3, 3))) is None and fixed_cam_scale([np.nan]) is None


def test_real_cells_show_signed_evidence_on_the_bundle_scale(clf):
    """A cell the model calls normal has no blast-red where its CAM is negative; weak and strong blasts differ."""
    crops = clf.bundle.golden.crops
    preds = clf.classify(crops)
    overlays = [evidence_overlay(c, p.cam, clf.cam_scale) for c, p in zip(crops, preds, strict=True)]
    normals = [i for i, p in enumerate(preds) if not p.positive]
    assert normals
    for i in normals:
        negative = upsample_signed(preds[i].cam, crops[i].shape[:2]) < 0
        assert negative.any()
        shift = _shift(overlays[i], crops[i])
        assert shift[negative].max() <= 1.0, f"golden cell {i} (p={preds[i].probability:.3f}) shows red"
    # The scale is the bundle's, not each cell's: the strongest blast's evidence at a quarter of its strength
    # (a weak blast) gives a faint overlay, not another saturated one.
    strong = max((i for i, p in enumerate(preds) if p.positive), key=lambda i: float(preds[i].cam.max()))
    weak_overlay = evidence_overlay(crops[strong], preds[strong].cam / 4, clf.cam_scale)
    ws, ss = _shift(weak_overlay, crops[strong]), _shift(overlays[strong], crops[strong])
    assert np.percentile(ss, 99) > 2 * np.percentile(ws, 99), "both look equally hot: the scale is not fixed"


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
