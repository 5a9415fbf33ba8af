"""Cell review: append-only history, current verdict = newest row, keyboard-free API and form paths."""

from __future__ import annotations

import re
import sqlite3

import pytest

from device.errors import InputError, NotFoundError
from device.service import Appliance
from device.store import SCHEMA_VERSION, Store
from device.web import create_app
from tests.test_slides import record


def token(client, path="/") -> str:
    return re.search(r'name="csrf-token" content="([^"]+)"', client.get(path).get_data(as_text=True)).group(1)


def test_reviews_are_appended_and_latest_wins(tmp_path):
    store = Store(tmp_path)
    cap = store.save_capture(record("S1", [True, False, False], review=[True, False, True]))
    cells = store.get_capture(cap)["cells"]
    first = store.add_review(cells[0]["id"], "normal", "alice")
    assert first["action"] == "reclassify" and first["model_label"] == "blast"
    second = store.add_review(cells[0]["id"], "blast", "bob", note="looked again")
    assert second["action"] == "confirm" and second["id"] > first["id"]
    history = store.review_history(cell_id=cells[0]["id"])
    assert [(r["label"], r["reviewer"]) for r in history] == [("normal", "alice"), ("blast", "bob")]
    assert store.current_reviews(cap)[cells[0]["id"]]["reviewer"] == "bob"
    rows = {c["cell_id"]: c for c in store.slide_cells("S1")}
    assert rows[cells[0]["id"]]["verdict"] == "blast" and rows[cells[1]["id"]]["reviewed_label"] is None
    assert len(store.slide_cells("S1", reviewed_only=True)) == 1
    with pytest.raises(InputError, match="label"):
        store.add_review(cells[1]["id"], "maybe", "alice")
    with pytest.raises(InputError, match="reviewer"):
        store.add_review(cells[1]["id"], "blast", "  ")
    with pytest.raises(NotFoundError):
        store.add_review(99999, "blast", "alice")
    # No store method changes or deletes a review; the raw table only ever grows.
    assert not [m for m in dir(Store) if "review" in m and any(w in m for w in ("update", "delete", "edit", "remove"))]
    with sqlite3.connect(store.db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM reviews").fetchone()[0] == 2
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5


def test_migration_from_version_2_keeps_data(tmp_path):
    import device.store as st

    old = st.MIGRATIONS[:2]
    conn = sqlite3.connect(tmp_path / st.DB_FILE)
    for step in old:
        conn.executescript(step)
    conn.execute("PRAGMA user_version=2")
    conn.execute("INSERT INTO slides (id, created_at) VALUES ('OLD', '2025-01-01T00:00:00')")
    conn.commit()
    conn.close()
    store = Store(tmp_path)
    assert store.slide_summary("OLD")["id"] == "OLD"
    assert store.review_history(slide_id="OLD") == []


def test_search_filters(tmp_path):
    store = Store(tmp_path)
    a = store.save_capture(record("S1", [True, False], review=[True, False]))
    b = store.save_capture(record("S2", [False]))
    assert store.search_captures()[0] == 2
    assert [c["id"] for c in store.search_captures(slide_id="S2")[1]] == [b]
    assert [c["id"] for c in store.search_captures(label="blast")[1]] == [a]
    assert [c["id"] for c in store.search_captures(needs_review=True)[1]] == [a]
    blast_cell = store.get_capture(a)["cells"][0]["id"]
    store.add_review(blast_cell, "normal", "alice")  # the reviewer's verdict is what the label filter sees
    assert store.search_captures(label="blast")[0] == 0
    assert store.search_captures(needs_review=True)[0] == 0
    assert store.search_captures(needs_review=False)[0] == 2
    today = store.get_capture(a)["created_at"][:10]
    assert store.search_captures(date_from=today, date_to=today)[0] == 2
    assert store.search_captures(date_to="2000-01-01")[0] == 0
    total, page = store.search_captures(limit=1, offset=1)
    assert total == 2 and [c["id"] for c in page] == [a]


def test_review_over_the_web(config):
    with Appliance(config) as appliance:
        cap_id = appliance.capture_now("test").capture_id
        client = create_app(appliance).test_client()
        tok = token(client, f"/captures/{cap_id}")
        cap = client.get(f"/api/captures/{cap_id}").get_json()
        cell = cap["cells"][0]
        other = "normal" if cell["label"] == "blast" else "blast"
        resp = client.post(
            f"/api/cells/{cell['id']}/review", json={"label": other, "reviewer": "tech1"}, headers={"X-CSRFToken": tok}
        )
        assert resp.status_code == 201 and resp.get_json()["action"] == "reclassify"
        resp = client.post(f"/api/cells/{cell['id']}/review", json={"label": "confirm"}, headers={"X-CSRFToken": tok})
        assert resp.get_json()["label"] == cell["label"] and resp.get_json()["reviewer"] == "local"
        # The form path (no JavaScript) appends too.
        resp = client.post(f"/cells/{cell['id']}/review", data={"label": other, "csrf_token": tok})
        assert resp.status_code == 302 and f"#cell-{cell['id']}" in resp.headers["Location"]
        got = client.get(f"/api/cells/{cell['id']}").get_json()
        assert [r["label"] for r in got["reviews"]] == [other, cell["label"], other] and got["verdict"] == other
        page = client.get(f"/captures/{cap_id}").get_data(as_text=True)
        assert "Review history" in page and "reclassify" in page and "tech1" in page
        assert 'viewBox="0 0 ' in page and f'id="box-{cell["id"]}"' in page
        assert (
            client.post(
                f"/api/cells/{cell['id']}/review", json={"label": "x"}, headers={"X-CSRFToken": tok}
            ).status_code
            == 400
        )
        assert (
            client.post("/api/cells/99999/review", json={"label": "blast"}, headers={"X-CSRFToken": tok}).status_code
            == 404
        )
        assert (
            client.post(f"/api/cells/{cell['id']}/review", data="nope", headers={"X-CSRFToken": tok}).status_code == 400
        )
        # Slide review: who and when. With cells left unreviewed, only with their number confirmed.
        url = f"/api/slides/{appliance.slide_id}/reviewed"
        unreviewed = client.get(f"/api/slides/{appliance.slide_id}").get_json()["unreviewed"]
        assert unreviewed == len(cap["cells"]) - 1
        resp = client.post(url, json={"reviewer": "tech1"}, headers={"X-CSRFToken": tok})
        assert resp.status_code == 409 and f"confirm_unreviewed={unreviewed}" in resp.get_json()["error"]
        resp = client.post(url, json={"confirm_unreviewed": unreviewed + 1}, headers={"X-CSRFToken": tok})
        assert resp.status_code == 409 and f"not {unreviewed + 1} as confirmed" in resp.get_json()["error"]
        for bad in (-1, "2", 1.5):
            assert client.post(url, json={"confirm_unreviewed": bad}, headers={"X-CSRFToken": tok}).status_code == 400
        assert client.get(f"/api/slides/{appliance.slide_id}").get_json()["reviewed_at"] is None
        resp = client.post(
            url, json={"reviewer": "tech1", "confirm_unreviewed": unreviewed}, headers={"X-CSRFToken": tok}
        )
        assert resp.status_code == 200 and resp.get_json()["reviewed_by"] == "tech1" and resp.get_json()["reviewed_at"]
        assert client.post("/api/slides/NOPE/reviewed", json={}, headers={"X-CSRFToken": tok}).status_code == 404
        report = client.get(f"/slides/{appliance.slide_id}").get_data(as_text=True)
        assert "reviewed" in report and "tech1" in report and "Wilson CI" in report and "@media print" not in report
        hist = client.get(f"/api/reviews?slide={appliance.slide_id}").get_json()["reviews"]
        assert len(hist) == 3
        assert len(client.get("/api/reviews").get_json()["reviews"]) == 3  # no filter: the newest reviews
        assert client.get("/api/reviews?cell=abc").status_code == 400
