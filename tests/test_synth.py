"""Tests for the synthetic cell and smear generator (training.synth)."""

import json
import re

import cv2
import numpy as np
import pytest

from training.synth import (
    Stain,
    random_stain,
    render_cell,
    render_field,
    write_cell_dataset,
    write_fields,
)

CNMC_NAME = re.compile(r"^UID_(H?\d+)_(\d+)_(\d+)_(all|hem)\.bmp$")


def _nucleus_mask(rgb: np.ndarray) -> np.ndarray:
    """Purple/violet pixels: red and blue well above green (cytoplasm has G > R)."""
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    return (r - g > 12) & (b - g > 40)


def _boxes_overlap(a, b) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def test_render_cell_is_deterministic_and_on_black():
    stain = random_stain(np.random.default_rng(3))
    a = render_cell(np.random.default_rng(7), "all", size=96, stain=stain)
    b = render_cell(np.random.default_rng(7), "all", size=96, stain=stain)
    c = render_cell(np.random.default_rng(8), "all", size=96, stain=stain)
    assert a.dtype == np.uint8 and a.shape == (96, 96, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # C-NMC style: the corners are the black background, the centre is the cell.
    for corner in (a[:4, :4], a[:4, -4:], a[-4:, :4], a[-4:, -4:]):
        assert corner.max() == 0
    assert a[40:56, 40:56].mean() > 40


def test_render_cell_rejects_unknown_label():
    with pytest.raises(ValueError, match="label"):
        render_cell(np.random.default_rng(0), "blast", size=64)


def test_labels_differ_in_morphology():
    rng = np.random.default_rng(11)
    stats = {}
    for label in ("all", "hem"):
        nuc_frac, cell_frac, nuc_bright = [], [], []
        for _ in range(30):
            img = render_cell(rng, label, size=96, stain=random_stain(rng))
            nuc = _nucleus_mask(img)
            nuc_frac.append(nuc.mean())
            cell_frac.append((img.max(axis=2) > 20).mean())
            nuc_bright.append(img[nuc].mean())
        stats[label] = (np.mean(nuc_frac), np.mean(cell_frac), np.mean(nuc_bright))
    all_nuc, all_cell, all_bright = stats["all"]
    hem_nuc, hem_cell, hem_bright = stats["hem"]
    assert all_cell > 1.3 * hem_cell  # blasts are larger
    assert all_nuc > 1.4 * hem_nuc  # ... with a larger nucleus
    assert all_bright > hem_bright + 15  # open chromatin is lighter than dense


def test_stain_changes_colour_not_label_shape():
    neutral = render_cell(np.random.default_rng(5), "hem", size=80, stain=Stain())
    cast = render_cell(np.random.default_rng(5), "hem", size=80, stain=Stain(gain=0.8, cast=(1.05, 0.95, 1.0)))
    assert (neutral.max(axis=2) > 0).sum() == pytest.approx((cast.max(axis=2) > 0).sum(), rel=0.02)
    assert cast.mean() < neutral.mean()


def test_write_cell_dataset_layout(tmp_path):
    summary = write_cell_dataset(tmp_path, n_subjects=5, cells_per_subject=4, size=64, seed=2)
    root = tmp_path / "training_data"
    for fold in range(3):
        for label in ("all", "hem"):
            assert (root / f"fold_{fold}" / label).is_dir()
    files = sorted(root.rglob("*.bmp"))
    assert len(files) == 20 == summary["n_images"]
    subject_folds: dict[str, set] = {}
    counts = {"all": 0, "hem": 0}
    for path in files:
        m = CNMC_NAME.match(path.name)
        assert m, path.name
        subject, label = m.group(1), m.group(4)
        assert path.parent.name == label
        assert subject.startswith("H") == (label == "hem")
        subject_folds.setdefault(subject, set()).add(path.parent.parent.name)
        counts[label] += 1
    assert all(len(f) == 1 for f in subject_folds.values())  # no subject leaks across folds
    assert counts == summary["per_class"]
    assert sum(summary["per_subject"].values()) == 20
    assert summary["synthetic"] is True and summary["seed"] == 2
    readme = (tmp_path / "SYNTHETIC_README.txt").read_text()
    assert "SYNTHETIC" in readme and "seed 2" in readme and "clinical" in readme
    img = cv2.imread(str(files[0]))
    assert img.shape == (64, 64, 3)


def test_write_cell_dataset_is_deterministic_and_rgb(tmp_path):
    write_cell_dataset(tmp_path / "a", n_subjects=2, cells_per_subject=2, size=64, seed=4)
    write_cell_dataset(tmp_path / "b", n_subjects=2, cells_per_subject=2, size=64, seed=4)
    fa = sorted((tmp_path / "a").rglob("*.bmp"))
    fb = sorted((tmp_path / "b").rglob("*.bmp"))
    assert [p.name for p in fa] == [p.name for p in fb]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb, strict=True))
    # Written as BGR, so reading back and converting gives violet nuclei (B > G).
    rgb = cv2.cvtColor(cv2.imread(str(fa[0])), cv2.COLOR_BGR2RGB)
    assert _nucleus_mask(rgb).sum() > 100


def test_blast_fraction_sets_subject_kinds(tmp_path):
    summary = write_cell_dataset(tmp_path, n_subjects=4, cells_per_subject=1, size=48, seed=0, blast_fraction=0.25)
    assert summary["per_class"] == {"all": 1, "hem": 3}
    assert sorted(summary["per_subject"]) == ["1", "H1", "H2", "H3"]


def test_render_field_boxes_and_colours():
    labels = ["all", "hem", "all", "hem"]
    field, cells = render_field(np.random.default_rng(1), 640, 480, 4, 0.1, labels=labels)
    again, _ = render_field(np.random.default_rng(1), 640, 480, 4, 0.1, labels=labels)
    assert field.dtype == np.uint8 and field.shape == (480, 640, 3)
    assert np.array_equal(field, again)
    assert [c["label"] for c in cells] == labels
    hsv = cv2.cvtColor(field, cv2.COLOR_RGB2HSV)
    saturated = hsv[..., 1] > 110
    inside = np.zeros(field.shape[:2], bool)
    for i, cell in enumerate(cells):
        x0, y0, x1, y1 = cell["box"]
        assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
        for other in cells[i + 1 :]:
            assert not _boxes_overlap(cell["box"], other["box"])
        inside[y0:y1, x0:x1] = True
        # A nucleus: a solid block of saturated violet pixels in every box.
        assert saturated[y0:y1, x0:x1].mean() > 0.2
    # Outside the white cells only platelets are that saturated: red cells are not.
    assert saturated[~inside].mean() < 0.01
    # Background near white, red cells pinkish (R > G).
    assert np.median(field[~inside].mean(axis=1)) > 150
    assert np.median(field[~inside][:, 0]) >= np.median(field[~inside][:, 1])
    sizes = {lab: [c["box"][2] - c["box"][0] for c in cells if c["label"] == lab] for lab in ("all", "hem")}
    assert np.mean(sizes["all"]) > np.mean(sizes["hem"])


def test_render_field_rejects_bad_labels():
    with pytest.raises(ValueError, match="n_white"):
        render_field(np.random.default_rng(0), 320, 240, 3, labels=["all"])
    with pytest.raises(ValueError, match="label"):
        render_field(np.random.default_rng(0), 320, 240, 1, labels=["blast"])


def test_write_fields_json_says_synthetic(tmp_path):
    paths = write_fields(tmp_path, n=2, width=640, height=480, n_white=(1, 3), seed=9)
    assert [p.name for p in paths] == ["field_0000.jpg", "field_0001.jpg"]
    for path in paths:
        img = cv2.imread(str(path))
        assert img.shape == (480, 640, 3)
        meta = json.loads(path.with_suffix(".json").read_text())
        assert meta["synthetic"] is True
        assert meta["generator"] == "leukocam.training.synth"
        assert meta["seed"] == 9 and meta["um_per_px"] == 0.1
        assert (meta["width"], meta["height"]) == (640, 480)
        assert 1 <= len(meta["cells"]) <= 3
        for cell in meta["cells"]:
            assert cell["label"] in ("all", "hem") and len(cell["box"]) == 4
    assert "SYNTHETIC" in (tmp_path / "SYNTHETIC_README.txt").read_text()


@pytest.mark.slow
def test_full_resolution_field_renders():
    # Speed is measured in `make bench`, not asserted here (this machine is noisy).
    field, cells = render_field(np.random.default_rng(0), 4056, 3040, 5, 0.1)
    assert field.shape == (3040, 4056, 3)
    assert len(cells) == 5
    for cell in cells:
        x0, y0, x1, y1 = cell["box"]
        assert 0 <= x0 < x1 <= 4056 and 0 <= y0 < y1 <= 3040
