"""Slides: grouping captures, the blast fraction with its CI, and retention that spares unreviewed results."""

from __future__ import annotations

import numpy as np
import pytest

from device.errors import InputError, NotFoundError
from device.imaging import encode_image
from device.service import Appliance
from device.stats import wilson_ci
from device.store import CaptureRecord, CellRecord, Store
from device.web import create_app


def record(slide: str, positives: list[bool], review: list[bool] | None = None, kb: int = 50) -> CaptureRecord:
    png = encode_image(np.random.default_rng(len(positives)).integers(0, 256, (64, 64, 3), dtype=np.uint8), "PNG")
    review = review or [False] * len(positives)
    cells = tuple(
        CellRecord((0, 0, 10, 10), 0.9 if p else 0.1, 2.0 if p else -2.0, "blast" if p else "normal", p, r, png, png)
        for p, r in zip(positives, review, strict=True)
    )
    field = encode_image(np.random.default_rng(kb).integers(0, 256, (kb * 4, 256, 3), dtype=np.uint8), "PNG")
    return CaptureRecord(slide, "test.png", "test", "ok", "", 256, kb * 4, 0.1, "sha", True, field, cells=cells)


def test_slide_summary_counts_and_ci(tmp_path):
    store = Store(tmp_path)
    store.save_capture(record("S1", [True, False, False], review=[False, True, False]))
    store.save_capture(record("S1", [True, False]))
    store.save_capture(record("S2", [False]))
    s1 = store.slide_summary("S1")
    assert (s1["captures"], s1["ok_captures"], s1["cells"], s1["positive"], s1["needs_review"]) == (2, 2, 5, 2, 1)
    assert s1["blast_fraction"] == pytest.approx(0.4)
    assert s1["blast_fraction_ci95"] == pytest.approx(list(wilson_ci(2, 5)))
    assert s1["blast_fraction_ci95"][0] < 0.4 < s1["blast_fraction_ci95"][1]
    assert store.slide_summary("nope") is None
    store.ensure_slide("EMPTY")
    empty = store.slide_summary("EMPTY")
    assert empty["cells"] == 0 and empty["blast_fraction"] is None
    assert {s["id"] for s in store.list_slides()} == {"S1", "S2", "EMPTY"}


def test_retention_deletes_only_reviewed_slides_oldest_first(tmp_path):
    store = Store(tmp_path)
    old = [store.save_capture(record("REVIEWED", [True], kb=40)) for _ in range(3)]
    keep = [store.save_capture(record("OPEN", [False], kb=40)) for _ in range(2)]
    store.mark_slide_reviewed("REVIEWED", by="tech1")
    total_mb = store.images_bytes() / 1e6
    # A cap that two captures' worth of deletions satisfy.
    per_capture = total_mb / 5
    result = store.apply_retention(total_mb - 1.5 * per_capture)
    assert result["deleted"] == old[:2] and not result["over_cap"]
    assert store.get_capture(old[2]) is not None
    # A cap below what the unreviewed slide needs: everything reviewed goes, nothing unreviewed does.
    result = store.apply_retention(0.001)
    assert result["deleted"] == [old[2]] and result["over_cap"]
    for cid in keep:
        cap = store.get_capture(cid)
        assert cap is not None and store.image_file("field", cid).is_file()
    assert store.reconcile().clean
    with pytest.raises(NotFoundError):
        store.mark_slide_reviewed("missing", by="x")


def test_new_slide_from_service_and_dashboard(config):
    with Appliance(config) as app:
        assert app.slide_id.startswith("slide-")
        app.new_slide("SMEAR-042")
        out = app.capture_now("test")
        assert app.store.get_capture(out.capture_id)["slide_id"] == "SMEAR-042"
        with pytest.raises(InputError, match="slide ID"):
            app.new_slide("../etc")
        client = create_app(app).test_client()
        assert client.post("/api/slides", json={"id": "bad id!"}).status_code == 400
        resp = client.post("/api/slides", json={"id": "SMEAR-043"})
        assert resp.status_code == 201 and app.slide_id == "SMEAR-043"
        summary = client.get("/api/slides/SMEAR-042").get_json()
        assert summary["captures"] == 1 and summary["cells"] >= 1
        assert client.get("/api/slides/NOPE").status_code == 404
        generated = app.new_slide()
        assert generated.startswith("slide-") and generated != "SMEAR-043"
        listing = client.get("/api/slides").get_json()
        assert listing["current"] == generated
        assert {"SMEAR-042", "SMEAR-043", generated} <= {s["id"] for s in listing["slides"]}
