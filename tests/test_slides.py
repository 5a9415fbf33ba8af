"""Slides: grouping captures, the blast fraction with its CI, and retention that spares unreviewed results."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from device.errors import ConflictError, InputError, NotFoundError
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


def review_all(store: Store, slide_id: str, by: str = "tech1") -> None:
    for cell in store.slide_cells(slide_id):
        store.add_review(cell["cell_id"], cell["model_label"], by)


def test_retention_deletes_only_reviewed_slides_oldest_first(tmp_path):
    store = Store(tmp_path)
    old = [store.save_capture(record("REVIEWED", [True], kb=40)) for _ in range(3)]
    keep = [store.save_capture(record("OPEN", [False], kb=40)) for _ in range(2)]
    review_all(store, "REVIEWED")
    review_all(store, "OPEN")  # reviewed cells, but the slide is not marked reviewed: kept
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


def test_flagged_for_review_counts_what_is_still_pending(tmp_path):
    """The slide's "flagged for review" goes down as flagged cells are reviewed, like `review=pending` does."""
    store = Store(tmp_path)
    a = store.save_capture(record("S1", [True, False, False], review=[True, True, False]))
    b = store.save_capture(record("S1", [False, True], review=[False, True]))

    def counts():
        s = store.slide_summary("S1")
        rows = {c["id"]: c for c in store.search_captures(slide_id="S1")[1]}
        recent = {c["id"]: c for c in store.recent_captures()}
        pending_captures = store.search_captures(slide_id="S1", needs_review=True)[0]
        assert {k: r["n_review"] for k, r in rows.items()} == {k: r["n_review"] for k, r in recent.items()}
        return (
            s["needs_review"],
            s["flagged"],
            s["unreviewed"],
            rows[a]["n_review"],
            rows[b]["n_review"],
            pending_captures,
        )

    assert counts() == (3, 3, 5, 2, 1, 2)
    flagged = [c for c in store.slide_cells("S1") if c["needs_review"]]
    store.add_review(flagged[0]["cell_id"], "blast", "alice")
    assert counts() == (2, 3, 4, 1, 1, 2)
    store.add_review(flagged[1]["cell_id"], "normal", "alice")
    store.add_review(flagged[1]["cell_id"], "blast", "bob")  # a second review of the same cell changes no count
    assert counts() == (1, 3, 3, 0, 1, 1)
    store.add_review(flagged[2]["cell_id"], "blast", "alice")
    assert counts() == (0, 3, 2, 0, 0, 0)
    assert store.search_captures(slide_id="S1", needs_review=False)[0] == 2
    assert [c["n_reviewed"] for c in store.search_captures(slide_id="S1")[1]] == [1, 2]  # newest first: b, a


def test_a_slide_with_unreviewed_cells_is_marked_reviewed_only_with_the_exact_count_confirmed(tmp_path):
    store = Store(tmp_path)
    store.save_capture(record("S1", [True, False, False]))
    store.save_capture(record("S1", [False, True]))
    store.save_capture(dataclasses.replace(record("S1", []), status="retake"))  # no cells: nothing to review
    with pytest.raises(ConflictError, match=r"5 unreviewed cell\(s\).*confirm_unreviewed=5"):
        store.mark_slide_reviewed("S1", by="tech1")
    cells = store.slide_cells("S1")
    store.add_review(cells[0]["cell_id"], "blast", "alice")
    with pytest.raises(ConflictError, match=r"4 unreviewed cell\(s\) now, not 5 as confirmed.*confirm_unreviewed=4"):
        store.mark_slide_reviewed("S1", by="tech1", confirm_unreviewed=5)  # stale: the count changed since
    for bad in (-1, True, "4"):
        with pytest.raises(InputError, match="confirm_unreviewed"):
            store.mark_slide_reviewed("S1", by="tech1", confirm_unreviewed=bad)
    assert store.slide_summary("S1")["reviewed_at"] is None  # nothing refused was recorded
    store.mark_slide_reviewed("S1", by="tech1", confirm_unreviewed=4)
    s = store.slide_summary("S1")
    assert s["reviewed_by"] == "tech1" and s["unreviewed"] == 4
    # A fully reviewed slide needs no confirmation; a confirmation of a number that is no longer true is refused.
    review_all(store, "S1")
    with pytest.raises(ConflictError, match="no unreviewed cells now, not 4"):
        store.mark_slide_reviewed("S1", by="tech2", confirm_unreviewed=4)
    store.mark_slide_reviewed("S1", by="tech2")
    store.mark_slide_reviewed("S1", by="tech2", confirm_unreviewed=0)
    assert store.slide_summary("S1")["reviewed_by"] == "tech2"
    with pytest.raises(NotFoundError):
        store.mark_slide_reviewed("missing", by="x", confirm_unreviewed=0)


def test_retention_never_deletes_a_capture_with_an_unreviewed_cell(tmp_path):
    store = Store(tmp_path)
    done = store.save_capture(record("S1", [True, False], kb=40))
    partly = store.save_capture(record("S1", [True, False], kb=40))
    retake = store.save_capture(dataclasses.replace(record("S1", [], kb=40), status="retake"))
    cells = store.get_capture(done)["cells"] + store.get_capture(partly)["cells"][:1]
    for c in cells:
        store.add_review(c["id"], c["label"], "alice")
    store.mark_slide_reviewed("S1", by="alice", confirm_unreviewed=1)  # marked, with one cell left unreviewed
    result = store.apply_retention(0.001)
    assert sorted(result["deleted"]) == [done, retake] and result["over_cap"]
    assert store.get_capture(partly) is not None and store.image_file("field", partly).is_file()
    assert store.slide_summary("S1")["unreviewed"] == 1
    # Once its last cell is reviewed, it may go too.
    store.add_review(store.get_capture(partly)["cells"][1]["id"], "normal", "alice")
    assert store.apply_retention(0.001)["deleted"] == [partly]
    assert store.reconcile().clean
