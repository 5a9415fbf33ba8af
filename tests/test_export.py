"""Export: reviewed cells as a dataset `training` reads (reviewer's labels), and per-slide CSV / JSON."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import zipfile

import pytest

from device import export
from device.service import Appliance
from device.store import Store
from device.web import create_app
from tests.test_slides import record
from training.datasets import read_dataset


def test_dataset_zip_is_readable_by_training_with_reviewer_labels(tmp_path):
    store = Store(tmp_path / "store")
    a = store.save_capture(record("S1", [True, False, True]))
    b = store.save_capture(record("S2", [False, False]))
    ca, cb = store.get_capture(a)["cells"], store.get_capture(b)["cells"]
    store.add_review(ca[0]["id"], "normal", "alice")  # model said blast: the export must say normal
    store.add_review(ca[1]["id"], "normal", "alice")
    store.add_review(ca[1]["id"], "blast", "bob")  # the newest review wins
    store.add_review(cb[0]["id"], "normal", "alice")
    # ca[2] and cb[1] are not reviewed: left out
    fh, n = export.export_dataset(store)
    assert n == 3
    with zipfile.ZipFile(fh) as zf:
        names = zf.namelist()
        assert {"README.txt", "manifest.csv", "subjects.csv"} <= set(names)
        assert "REVIEWER" in zf.read("README.txt").decode()
        manifest = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
        zf.extractall(tmp_path / "out")
    by_cell = {int(r["cell_id"]): r for r in manifest}
    assert by_cell[ca[0]["id"]]["label"] == "normal" and by_cell[ca[0]["id"]]["model_label"] == "blast"
    assert by_cell[ca[1]["id"]]["label"] == "blast" and by_cell[ca[1]["id"]]["reviewer"] == "bob"
    samples = read_dataset(tmp_path / "out")
    assert len(samples) == 3
    labels = {int(re.search(r"UID_\d+_\d+_(\d+)_", s.path.name).group(1)): s.label for s in samples}
    assert labels == {ca[0]["id"]: 0, ca[1]["id"]: 1, cb[0]["id"]: 0}
    assert len({s.subject for s in samples}) == 2  # one subject per slide: training splits by slide
    one, n1 = export.export_dataset(store, ["S2"])
    assert n1 == 1


def test_slide_results_csv_and_json(tmp_path):
    store = Store(tmp_path)
    a = store.save_capture(record("S1", [True, False]))
    cell = store.get_capture(a)["cells"][1]
    store.add_review(cell["id"], "blast", "alice")
    rows = list(csv.DictReader(io.StringIO(export.slide_results_csv(store, "S1"))))
    assert len(rows) == 2 and rows[1]["reviewed_label"] == "blast" and rows[1]["model_label"] == "normal"
    assert rows[1]["verdict"] == "blast" and rows[0]["reviewed_label"] == ""
    data = json.loads(export.results_json_bytes(store, "S1"))
    assert data["slide"]["cells"] == 2 and len(data["reviews"]) == 1 and data["provenance"]["model_sha256"] == ["sha"]
    assert "crop_file" not in data["cells"][0]


def test_export_over_http(config):
    with Appliance(config) as appliance:
        cap_id = appliance.capture_now("test").capture_id
        client = create_app(appliance).test_client()
        assert client.get("/api/export/dataset.zip").status_code == 404  # nothing reviewed yet
        cell = appliance.store.get_capture(cap_id)["cells"][0]
        appliance.store.add_review(cell["id"], "blast", "alice")
        resp = client.get(f"/api/export/dataset.zip?slide={appliance.slide_id}")
        assert resp.status_code == 200 and resp.mimetype == "application/zip"
        assert "attachment" in resp.headers["Content-Disposition"]
        with zipfile.ZipFile(io.BytesIO(resp.data)) as zf:
            assert any(n.startswith("cells/all/UID_1_") and n.endswith("_all.bmp") for n in zf.namelist())
            # the demo model is synthetic: every export says so
            assert zf.read("README.txt").decode().startswith("*** SYNTHETIC demo model")
            assert "model_synthetic" in zf.read("manifest.csv").decode().splitlines()[0]
        assert client.get("/api/export/dataset.zip?slide=NOPE").status_code == 404
        csv_resp = client.get(f"/api/slides/{appliance.slide_id}/results.csv")
        assert csv_resp.status_code == 200 and csv_resp.mimetype == "text/csv" and b"reviewed_label" in csv_resp.data
        rows = list(csv.DictReader(io.StringIO(csv_resp.data.decode())))
        assert rows and all(r["model_synthetic"] == "1" for r in rows)
        js = client.get(f"/api/slides/{appliance.slide_id}/results.json").get_json()
        assert js["cells"][0]["reviewed_label"] == "blast"
        assert js["warning"].startswith("*** SYNTHETIC demo model")
        assert client.get("/api/slides/NOPE/results.csv").status_code == 404


FORMULAS = ['=HYPERLINK("http://x","y")', "+SUM(1,2)", "-2+3", "@SUM(A1)", "\tcmd", "\rcmd"]


def _formula_cells(text: str) -> list[str]:
    """Cells a spreadsheet would run as formulas: starting with = + - @ tab CR, and not a plain number."""
    out = []
    for row in csv.reader(io.StringIO(text, newline="")):
        for cell in row:
            if cell.startswith(export.FORMULA_START):
                try:
                    float(cell)
                except ValueError:
                    out.append(cell)
    return out


def test_csv_cells_that_a_spreadsheet_would_run_are_escaped(tmp_path):
    store = Store(tmp_path)
    rec = record("-S1", [True, False])
    rec = dataclasses.replace(rec, cells=(dataclasses.replace(rec.cells[0], box=(-5, -3, 10, 10)), *rec.cells[1:]))
    cells = store.get_capture(store.save_capture(rec))["cells"]
    for i, name in enumerate(FORMULAS[:2]):
        store.add_review(cells[i]["id"], "normal", name, note="=cmd|'/c calc'!A1")

    text = export.slide_results_csv(store, "-S1")
    assert _formula_cells(text) == []
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [r["reviewer"] for r in rows] == ["'" + FORMULAS[0], "'" + FORMULAS[1]]
    assert rows[0]["slide_id"] == "'-S1"
    assert (rows[0]["x0"], rows[0]["y0"]) == ("-5", "-3")  # numbers stay numbers
    assert float(rows[0]["probability"]) == pytest.approx(0.9)

    fh, n = export.export_dataset(store)
    assert n == 2
    with zipfile.ZipFile(fh) as zf:
        manifest, subjects = zf.read("manifest.csv").decode(), zf.read("subjects.csv").decode()
    assert _formula_cells(manifest) == [] and _formula_cells(subjects) == []
    assert {r["reviewer"] for r in csv.DictReader(io.StringIO(manifest))} == {"'" + f for f in FORMULAS[:2]}
    assert list(csv.DictReader(io.StringIO(subjects))) == [{"subject": "1", "slide_id": "'-S1"}]
    # the JSON export is data, not a spreadsheet: unchanged
    data = json.loads(export.results_json_bytes(store, "-S1"))
    assert {r["reviewer"] for r in data["reviews"]} == set(FORMULAS[:2])


@pytest.mark.parametrize("text", FORMULAS)
def test_csv_safe_escapes_formula_text_only(text):
    assert export.csv_safe(text) == "'" + text
    assert export.csv_safe("alice") == "alice" and export.csv_safe("") == ""
    assert export.csv_safe(-0.5) == -0.5 and export.csv_safe(-3) == -3 and export.csv_safe(None) is None
