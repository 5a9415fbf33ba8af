"""Tests for the white-cell finder (device/cells.py) and its evaluation (training/finder_eval.py).

They run on real smear photos copied into tests/data/bccd (see its README),
so they pass in a clone without the shared data folder.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from device.cells import (
    FinderParams,
    FoundCell,
    estimate_um_per_px,
    find_white_cells,
    locate_white_cells,
    single_cell,
)
from device.imaging import decode_image
from training.finder_eval import evaluate_folder, match_boxes, read_voc_boxes

BCCD = Path(__file__).parent / "data" / "bccd"
IMAGES = BCCD / "JPEGImages"
ANNOTATIONS = BCCD / "Annotations"
BCCD_UM_PER_PX = 0.07  # red cells ~102 px across at 7.5 µm (see the data README)


def load(stem: str) -> np.ndarray:
    return decode_image(IMAGES / f"BloodImage_{stem}.jpg")


def truth(stem: str) -> list[tuple[float, float, float, float]]:
    return read_voc_boxes(ANNOTATIONS / f"BloodImage_{stem}.xml")


def centre(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def test_recall_and_precision_on_real_fields():
    # Measured: 10/10 found, 1 extra (the unannotated cell of 00228) -> 1.00 / 0.91.
    result = evaluate_folder(IMAGES, ANNOTATIONS, verbose=False)
    assert result["images"] == 10
    assert result["true_positives"] + result["false_negatives"] == 10
    assert result["recall"] >= 0.9
    assert result["precision"] >= 0.85
    assert result["mean_iou"] >= 0.6


def test_found_cells_keep_the_contract():
    rgb = load("00193")
    cells = find_white_cells(rgb)
    assert len(cells) == 2
    h, w = rgb.shape[:2]
    for cell in cells:
        assert isinstance(cell, FoundCell)
        x0, y0, x1, y1 = cell.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert cell.mask.dtype == bool and cell.mask.shape == (y1 - y0, x1 - x0)
        # The mask is the cell, not the whole box and not a sliver.
        assert 0.4 < cell.mask.mean() < 0.98
        assert 0.0 <= cell.score <= 1.0
        # A white-cell nucleus is tens of square microns (platelets are a few).
        assert 15 < cell.nucleus_area_um2 < 250
    assert cells[0].score >= cells[1].score
    # The second cell of 00193 is cut by the bottom edge; the first is whole.
    by_y = sorted(cells, key=lambda c: c.box[1])
    assert not by_y[0].touches_border and by_y[1].touches_border


def test_cell_cut_by_edge_is_flagged():
    cells = find_white_cells(load("00389"))
    assert len(cells) == 1 and cells[0].touches_border
    cells = find_white_cells(load("00055"))
    assert len(cells) == 1 and not cells[0].touches_border


def test_red_cells_and_platelets_are_not_reported():
    # The lower part of 00228: red cells (some overlapping) and a platelet, no white cell.
    crop = np.ascontiguousarray(load("00228")[180:])
    assert find_white_cells(crop) == []
    assert find_white_cells(crop, FinderParams(um_per_px=BCCD_UM_PER_PX)) == []


def test_empty_glass_gives_no_cells():
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(215, 3, (480, 640, 3)), 0, 255).astype(np.uint8)
    assert find_white_cells(glass) == []
    assert estimate_um_per_px(glass) is None


def test_scale_awareness():
    rgb = load("00193")
    small = find_white_cells(rgb, FinderParams(um_per_px=BCCD_UM_PER_PX))
    big_rgb = cv2.resize(rgb, (rgb.shape[1] * 2, rgb.shape[0] * 2), interpolation=cv2.INTER_LINEAR)
    big = find_white_cells(big_rgb, FinderParams(um_per_px=BCCD_UM_PER_PX / 2))
    assert len(big) == len(small) == 2
    for a, b in zip(sorted(small, key=lambda c: c.box), sorted(big, key=lambda c: c.box), strict=True):
        size_a = a.box[2] - a.box[0]
        assert np.allclose(np.array(b.box), 2 * np.array(a.box), atol=0.08 * 2 * size_a)
        assert b.nucleus_area_um2 == pytest.approx(a.nucleus_area_um2, rel=0.15)


def test_estimate_um_per_px_from_red_cells():
    # Measured on all 87 BCCD fields: median 0.080, range 0.064-0.093 (the nominal
    # 0.07 comes from loose hand-drawn red-cell boxes). Median within 20%, each within 35%.
    estimates = [estimate_um_per_px(decode_image(p)) for p in sorted(IMAGES.glob("*.jpg"))]
    assert all(e is not None for e in estimates)
    assert float(np.median(estimates)) == pytest.approx(BCCD_UM_PER_PX, rel=0.2)
    for e in estimates:
        assert e == pytest.approx(BCCD_UM_PER_PX, rel=0.35)


def test_estimate_follows_the_image_scale():
    rgb = load("00000")
    half = cv2.resize(rgb, (320, 240), interpolation=cv2.INTER_AREA)
    assert estimate_um_per_px(half) == pytest.approx(2 * estimate_um_per_px(rgb), rel=0.1)


def test_12_megapixel_field():
    rgb = load("00055")
    sx, sy = 4056 / rgb.shape[1], 3040 / rgb.shape[0]
    big = cv2.resize(rgb, (4056, 3040), interpolation=cv2.INTER_LINEAR)
    t0 = time.perf_counter()
    cells = find_white_cells(big)
    seconds = time.perf_counter() - t0
    assert len(cells) == 1
    (gx0, gy0, gx1, gy1) = truth("00055")[0]
    cx, cy = centre(cells[0].box)
    assert gx0 * sx <= cx <= gx1 * sx and gy0 * sy <= cy <= gy1 * sy
    assert cells[0].mask.shape == (
        cells[0].box[3] - cells[0].box[1],
        cells[0].box[2] - cells[0].box[0],
    )
    assert seconds < 5.0  # ~0.2 s on a 2-core x86; generous for slow CI machines


def test_single_cell_on_black_background():
    crop = np.zeros((200, 240, 3), np.uint8)
    cv2.circle(crop, (120, 100), 70, (190, 170, 220), -1)  # pale cytoplasm
    cv2.circle(crop, (115, 95), 40, (90, 50, 150), -1)  # violet nucleus
    cell = single_cell(crop)
    assert cell.box == (0, 0, 240, 200)
    expected = crop.max(axis=2) > 0
    assert cell.mask.shape == (200, 240) and cell.mask.dtype == bool
    assert (cell.mask == expected).mean() > 0.99
    # Nucleus ~ pi*40^2 px at 0.1 µm/px = ~50 µm^2.
    assert single_cell(crop, um_per_px=0.1).nucleus_area_um2 == pytest.approx(np.pi * 40**2 * 0.01, rel=0.1)


def test_single_cell_without_black_background():
    crop = np.ascontiguousarray(load("00055")[100:260, 200:360])
    cell = single_cell(crop)
    assert cell.mask.all()
    assert cell.box == (0, 0, 160, 160)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((64, 64, 3), np.float32), "uint8"),
        (np.zeros((64, 64), np.uint8), "HxWx3"),
        (np.zeros((64, 64, 4), np.uint8), "HxWx3"),
        ([[0, 0, 0]], "numpy array"),
    ],
)
def test_bad_input_is_refused(bad, message):
    for fn in (find_white_cells, estimate_um_per_px, single_cell):
        with pytest.raises(ValueError, match=message):
            fn(bad)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="um_per_px"):
        FinderParams(um_per_px=-1.0)
    with pytest.raises(ValueError, match="max_cell_um"):
        FinderParams(min_cell_um=10, max_cell_um=5)


def test_matching_rule():
    gt = [(0, 0, 100, 100), (200, 0, 300, 100)]
    # Centre inside the first box; a duplicate of it; a box on neither.
    m = match_boxes([(10, 10, 90, 90), (20, 20, 95, 95), (400, 400, 450, 450)], gt)
    assert (m.true_positives, m.false_positives, m.false_negatives) == (1, 2, 1)


def test_synthetic_fields():
    synth = pytest.importorskip("training.synth")
    tp = fp = fn = 0
    for seed in range(4):
        rng = np.random.default_rng(seed)
        um = (0.1, 0.15, 0.07, 0.2)[seed]
        rgb, cells = synth.render_field(rng, 960, 720, n_white=2, um_per_px=um, stain=synth.random_stain(rng))
        m = match_boxes([c.box for c in find_white_cells(rgb)], [tuple(c["box"]) for c in cells])
        tp, fp, fn = tp + m.true_positives, fp + m.false_positives, fn + m.false_negatives
        assert estimate_um_per_px(rgb) == pytest.approx(um, rel=0.3)
    assert tp / (tp + fn) >= 0.85 and tp / (tp + fp) >= 0.85


def test_cells_cut_in_threads_and_in_any_order_are_the_finders_cells():
    # The pipeline locates the nuclei, then cuts each kept cell out in a worker thread while the model classifies
    # the cells cut before it: the cuts must not depend on each other, on their order, or on the thread.
    from concurrent.futures import ThreadPoolExecutor

    from training.synth import render_field

    rgb, _ = render_field(np.random.default_rng(3), 1600, 1200, 12, um_per_px=0.2)
    options = FinderParams(um_per_px=0.2)
    whole = find_white_cells(rgb, options)
    located = locate_white_cells(rgb, options)
    assert len(located) == len(whole) >= 8
    assert [c.score for c in whole] == sorted((c.score for c in whole), reverse=True)  # strongest stain first
    with ThreadPoolExecutor(4) as pool:
        cut = dict(
            zip(reversed(range(len(located))), pool.map(located.cut, reversed(range(len(located)))), strict=True)
        )
    for i, c in enumerate(whole):
        assert cut[i].box == c.box and cut[i].touches_border == c.touches_border
        assert cut[i].nucleus_area_um2 == c.nucleus_area_um2
        np.testing.assert_array_equal(cut[i].mask, c.mask)
    assert len(locate_white_cells(np.full((300, 300, 3), 255, np.uint8))) == 0  # a blank field: nothing to cut
