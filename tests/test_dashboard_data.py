"""What the dashboard shows, on the shipped demo fields: each cell counted once, honest heatmaps.

- The same field captured twice into a slide does not double the slide's cells; different fields give no
  false repeats (the duplicate bound is measured here: device/store/duplicates.py).
- The capture JSON carries what the pages need: `duplicate_of` per cell, `cam_scale`, crop and heatmap URLs.
- The stored heatmap JPEG shows signed evidence on the bundle's fixed scale: a cell the model calls normal
  has no blast-red where its CAM is negative.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from device.bundle import load_bundle
from device.classifier import Classifier
from device.heatmap import upsample_signed
from device.imaging import decode_image
from device.pipeline import Analyzer, encode_crops, to_record
from device.service import Appliance
from device.store import Store
from device.store.duplicates import MAX_HAMMING, hamming
from device.web import create_app


@pytest.fixture(scope="module")
def clf(demo_bundle_dir):
    with Classifier(load_bundle(demo_bundle_dir), threads=1) as c:
        yield c


@pytest.fixture(scope="module")
def analyses(clf, demo_fields_dir):
    """Each shipped demo field analysed once: {file name: FieldAnalysis}."""
    from device.config import Config

    analyzer = Analyzer(clf, Config())
    return {p.name: analyzer.analyse(decode_image(p)) for p in sorted(demo_fields_dir.glob("*.jpg"))}


def _save(store: Store, analysis, slide: str, source: str, clf: Classifier) -> int:
    rec = to_record(
        analysis,
        slide_id=slide,
        source=source,
        trigger="test",
        model_sha256=clf.bundle.sha256,
        model_synthetic=True,
    )
    capture_id = store.save_capture(rec)
    store.attach_cell_crops(capture_id, encode_crops(analysis))  # the archival crops follow the result
    return capture_id


def test_the_same_field_captured_twice_counts_once(tmp_path, clf, analyses, demo_fields_dir):
    store = Store(tmp_path, min_free_mb=0)
    name = sorted(analyses)[0]
    first = _save(store, analyses[name], "S", name, clf)
    # The camera sees the same field again: a new analysis of the same frame (as the replay camera gives it).
    from device.config import Config

    again = Analyzer(clf, Config()).analyse(decode_image(demo_fields_dir / name))
    same = [hamming(a.dhash, b.dhash) for a, b in zip(analyses[name].cells, again.cells, strict=True)]
    second = _save(store, again, "S", name, clf)
    n = len(analyses[name].cells)
    s = store.slide_summary("S")
    assert n >= 2 and (s["captures"], s["cells"], s["duplicates"]) == (2, n, n), s
    originals = [c["id"] for c in store.get_capture(first)["cells"]]
    assert [c["duplicate_of"] for c in store.get_capture(second)["cells"]] == originals
    assert max(same) == 0  # the same frame gives the same crops: identical hashes
    assert s["blast_fraction"] == pytest.approx(sum(c.positive for c in analyses[name].cells) / n)


def test_the_stored_crop_is_the_models_input_pixel_for_pixel(tmp_path, clf, analyses):
    # The crop PNG (fast OpenCV encoding, device.pipeline.encode_crop_png) is lossless: a reviewer sees, and an
    # export hands on as training data, exactly what the model classified.
    store = Store(tmp_path, min_free_mb=0)
    name, analysis = sorted(analyses.items())[0]
    cap = store.get_capture(_save(store, analysis, "P", name, clf))
    assert len(cap["cells"]) == len(analysis.cells) >= 2
    for row, cell in zip(cap["cells"], analysis.cells, strict=True):
        np.testing.assert_array_equal(decode_image(store.image_file("crop", row["id"])), cell.crop)
        heatmap = decode_image(store.image_file("heatmap", row["id"])).astype(np.int16)
        assert np.abs(heatmap - cell.heatmap).mean() < 3  # the overlay, through JPEG


def test_a_field_with_more_cells_than_the_limit_keeps_the_strongest(clf, analyses, demo_fields_dir):
    # The pipeline cuts and classifies only the max_cells strongest-stained cells and counts the rest.
    import dataclasses

    from device.config import Config

    name, whole = next((n, a) for n, a in sorted(analyses.items()) if len(a.cells) >= 3)
    base = Config()
    limited = dataclasses.replace(base, finder=dataclasses.replace(base.finder, max_cells=2))
    analysis = Analyzer(clf, limited).analyse(decode_image(demo_fields_dir / name))
    assert [c.box for c in analysis.cells] == [c.box for c in whole.cells[:2]]
    assert [c.probability for c in analysis.cells] == pytest.approx([c.probability for c in whole.cells[:2]])
    assert analysis.skipped == len(whole.cells) - 2 + whole.skipped


def test_crop_png_options_work_without_opencvs_filter_option():
    # OpenCV before 4.12 (the device extra allows 4.9) has no per-row filter option: the crop PNG is then
    # encoded with libpng's own filter choice, still lossless.
    import types

    import cv2

    from device.pipeline import png_fast_options

    old = types.SimpleNamespace(
        **{k: getattr(cv2, k) for k in dir(cv2) if k.startswith("IMWRITE_PNG") and "FILTER" not in k}
    )
    options = png_fast_options(old)
    assert cv2.IMWRITE_PNG_FILTER not in options[::2] and cv2.IMWRITE_PNG_FILTER in png_fast_options()[::2]
    crop = np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", crop, list(options))
    assert ok and np.array_equal(cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), crop)


def test_different_fields_give_no_false_repeats(tmp_path, clf, analyses):
    store = Store(tmp_path, min_free_mb=0)
    for name, analysis in analyses.items():
        _save(store, analysis, "T", name, clf)
    total = sum(len(a.cells) for a in analyses.values())
    s = store.slide_summary("T")
    assert (s["cells"], s["duplicates"]) == (total, 0)
    # The measurement behind MAX_HAMMING: distances between all pairs of different cells of the demo fields
    # (13 cells, each hashed on its own box: the smallest is 13 bits of 64) against the same cell seen again
    # (0 bits: test above). A bound at half the smallest gap keeps different cells apart.
    cells = [c for a in analyses.values() for c in a.cells]
    assert all(c.dhash is not None for c in cells)
    smallest = min(hamming(a.dhash, b.dhash) for a, b in itertools.combinations(cells, 2))
    assert smallest >= 2 * MAX_HAMMING, (
        f"two different demo cells are only {smallest} bits apart (largest same-cell distance: 0); "
        f"MAX_HAMMING = {MAX_HAMMING} leaves too little margin"
    )


def test_capture_json_and_stored_heatmaps_are_what_the_dashboard_needs(config):
    with Appliance(config) as app:
        ids = [app.capture_now("test").capture_id for _ in range(4)]  # the replay camera: fields 0, 1, 2, then 0
        app.wait_archived()
        client = create_app(app).test_client()
        caps = [client.get(f"/api/captures/{i}").get_json() for i in ids]
        for cap in caps:
            assert cap["cam_scale"] == pytest.approx(app.classifier.cam_scale)
            for cell in cap["cells"]:
                assert "duplicate_of" in cell and "dhash" not in cell
                for url in (cell["crop_url"], cell["heatmap_url"]):  # the overlay and the plain crop, same size
                    assert client.get(url).status_code == 200
        assert all(c["duplicate_of"] is None for cap in caps[:3] for c in cap["cells"])
        assert [c["duplicate_of"] for c in caps[3]["cells"]] == [c["id"] for c in caps[0]["cells"]]
        summary = client.get(f"/api/slides/{app.slide_id}").get_json()
        assert summary["duplicates"] == len(caps[0]["cells"])
        assert summary["cells"] == sum(len(c["cells"]) for c in caps[:3]) == summary["unreviewed"]
        assert summary["reviewed_cells"] == 0

        # The stored overlay: decode it and the crop the model saw, and the cell's signed CAM again.
        normals, magnitudes = 0, []
        for cap in caps[:3]:
            for cell in cap["cells"]:
                crop = decode_image(app.store.image_file("crop", cell["id"]))
                heat = decode_image(app.store.image_file("heatmap", cell["id"]))
                pred = app.classifier.classify(crop[None])[0]
                assert pred.label == cell["label"]
                d = heat.astype(np.float32) - crop.astype(np.float32)
                redder = d[..., 0] - d[..., 2]
                cam = upsample_signed(pred.cam, crop.shape[:2])
                magnitudes.append((float(np.abs(pred.cam).max()), float(np.percentile(np.abs(redder), 99))))
                if not pred.positive:
                    normals += 1
                    # JPEG blurs colour a little: no pixel where the evidence is for normal turns red beyond that.
                    assert np.percentile(redder[cam < 0], 99.5) <= 12, f"cell {cell['id']} shows blast-red"
        assert normals >= 2
        # Weakest and strongest evidence do not both look saturated (each cell is no longer its own scale).
        magnitudes.sort()
        (weak_cam, weak_colour), (strong_cam, strong_colour) = magnitudes[0], magnitudes[-1]
        assert strong_cam > 2 * weak_cam and strong_colour > 1.5 * weak_colour, magnitudes
