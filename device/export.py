"""Exports: reviewed cells as a training dataset, and per-slide results as CSV / JSON.

The dataset uses the C-NMC 2019 naming that `training.datasets.read_dataset`
reads (`UID_<subject>_<image>_<cell>_<all|hem>.bmp`) inside class folders
`all/` and `hem/`, so both of its conventions agree. The subject number stands
for the slide (the manifest maps it back), so training splits by slide. The
label is the reviewer's current verdict, never the model's guess.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import zipfile
from datetime import UTC, datetime

from device.imaging import decode_image, encode_image

CNMC_CLASS = {"blast": "all", "normal": "hem"}
RESULT_FIELDS = (
    "slide_id",
    "capture_id",
    "cell_id",
    "idx",
    "x0",
    "y0",
    "x1",
    "y1",
    "probability",
    "model_label",
    "needs_review",
    "reviewed_label",
    "reviewer",
    "reviewed_at",
    "verdict",
    "model_sha256",
    "model_synthetic",
    "captured_at",
)
# manifest.csv is a `training.datasets.read_manifest` manifest (path,label,subject first: `leukocam data inspect
# manifest.csv` and `leukocam train manifest.csv` read it); the other columns are provenance. Before issue #13
# the first column was `file`, which the reader still accepts.
MANIFEST_FIELDS = (
    "path",
    "label",
    "subject",
    "slide_id",
    "capture_id",
    "cell_id",
    "model_label",
    "probability",
    "reviewer",
    "reviewed_at",
    "model_sha256",
    "model_synthetic",
    "captured_at",
)

SYNTHETIC_WARNING = """*** SYNTHETIC demo model: these results are not clinical. The cells were classified by a model trained
on synthetic images; install a model trained on real cells before any use on patient slides. ***
"""

README = """LeukoCam reviewed-cell export
=============================

Made by LeukoCam {version} on {when} (UTC) from the store at {store}.
Slides: {slides}
Cells: {n} ({blast} blast, {normal} normal)

Labels are the REVIEWER'S verdicts (the newest review of each cell), not the
model's predictions; manifest.csv has both, plus who reviewed each cell and when.
Only cells that a person reviewed are included.

Layout (read by `training.datasets.read_dataset`):
  cells/all/UID_<subject>_<capture>_<cell>_all.bmp   blast (C-NMC "all")
  cells/hem/UID_<subject>_<capture>_<cell>_hem.bmp   normal (C-NMC "hem")
<subject> is a number per slide (see subjects.csv) so training can split by slide.

Train on it, e.g.: leukocam train cells/ ...  (see the project README)
Research use only: not a diagnosis.
"""


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
"""A spreadsheet takes a cell starting with one of these as a formula (CSV injection)."""


def csv_safe(value):
    """A text cell that a spreadsheet would run as a formula gets a leading ' (shown as text); others unchanged.

    Only str values: numbers (a negative float included) stay numbers.
    """
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def _safe_row(row: dict) -> dict:
    return {k: csv_safe(v) for k, v in row.items()}


def _result_row(cell: dict) -> dict:
    x0, y0, x1, y1 = cell["box"]
    return _safe_row({**{k: cell.get(k) for k in RESULT_FIELDS}, "x0": x0, "y0": y0, "x1": x1, "y1": y1})


def slide_results_csv(store, slide_id: str) -> str:
    """One row per cell of the slide: the model's result and the current review (text cells made formula-safe)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, lineterminator="\n")
    writer.writeheader()
    for cell in store.slide_cells(slide_id):
        writer.writerow(_result_row(cell))
    return buf.getvalue()


def slide_results_json(store, slide_id: str) -> dict:
    """The slide summary, its provenance, every cell, and the review history (and a SYNTHETIC warning)."""
    cells = store.slide_cells(slide_id)
    for c in cells:
        c.pop("crop_file", None)
    synthetic = any(c.get("model_synthetic") for c in cells)
    return {
        "warning": SYNTHETIC_WARNING.strip() if synthetic else None,
        "slide": store.slide_summary(slide_id),
        "provenance": store.slide_provenance(slide_id),
        "cells": cells,
        "reviews": store.review_history(slide_id=slide_id, limit=100_000),
    }


def export_dataset(
    store, slide_ids: list[str] | None = None, version: str = ""
) -> tuple[tempfile.SpooledTemporaryFile, int]:
    """Write reviewed cells as a training dataset zip into a (spooled) temp file.

    Returns (file positioned at 0, number of cells). Cells whose crop is not on disk
    (retention; a power cut before it was written) are skipped and counted in the README.
    """
    cells = []
    for sid in slide_ids if slide_ids else [None]:
        cells += store.slide_cells(sid, reviewed_only=True)
    slides = sorted({c["slide_id"] for c in cells})
    subject = {s: i + 1 for i, s in enumerate(slides)}
    out = tempfile.SpooledTemporaryFile(max_size=32 * 1024 * 1024)
    manifest = io.StringIO()
    writer = csv.DictWriter(manifest, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    counts = {"blast": 0, "normal": 0}
    missing = 0
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for c in cells:
            crop = store.images_dir / c["crop_file"]
            if not crop.is_file():
                missing += 1
                continue
            cls = CNMC_CLASS[c["reviewed_label"]]
            name = f"cells/{cls}/UID_{subject[c['slide_id']]}_{c['capture_id']}_{c['cell_id']}_{cls}.bmp"
            zf.writestr(name, encode_image(decode_image(crop), "BMP"))
            counts[c["reviewed_label"]] += 1
            writer.writerow(
                _safe_row(
                    {
                        "path": name,
                        "label": c["reviewed_label"],
                        "subject": subject[c["slide_id"]],
                        **{k: c[k] for k in MANIFEST_FIELDS if k in c and k not in ("path", "label", "subject")},
                    }
                )
            )
        zf.writestr("manifest.csv", manifest.getvalue())
        sub = io.StringIO()
        csv.writer(sub, lineterminator="\n").writerows(
            [("subject", "slide_id"), *((v, csv_safe(k)) for k, v in subject.items())]
        )
        zf.writestr("subjects.csv", sub.getvalue())
        text = README.format(
            version=version,
            when=datetime.now(UTC).isoformat(timespec="seconds"),
            store=store.data_dir,
            slides=", ".join(slides) or "(none)",
            n=sum(counts.values()),
            blast=counts["blast"],
            normal=counts["normal"],
        )
        if missing:
            text += (
                f"\n{missing} reviewed cell(s) were left out: their crops are not on disk (deleted by retention, "
                "or lost in a power cut or a full disk just after the capture).\n"
            )
        if any(c.get("model_synthetic") for c in cells):
            text = SYNTHETIC_WARNING + "\n" + text
        zf.writestr("README.txt", text)
    out.seek(0)
    return out, sum(counts.values())


def results_json_bytes(store, slide_id: str) -> bytes:
    return json.dumps(slide_results_json(store, slide_id), indent=1).encode()
