"""What the dashboard can do, once: the HTML pages and the JSON API both call these.

Each action takes plain values, returns plain values and raises the domain errors of
`device.errors`; the app's error handler turns those into HTTP status codes by type
(`device.web.http_status`), so neither blueprint decides codes from message text.
"""

from __future__ import annotations

import shutil

from device.errors import InputError, NotFoundError
from device.service import CaptureOutcome
from device.web.common import appliance, latency_stats, model_card, reviewer, store


def upload(data, filename: str, single_cell: bool, add_to_slide: bool = False) -> CaptureOutcome:
    """Analyse an uploaded image (bytes or the spooled file) like a capture; ImageError for what cannot be
    read. It counts in the current slide only with `add_to_slide` (else it goes to the uploads slide)."""
    if not filename:
        raise InputError("choose an image file to upload (multipart form field 'image')")
    return appliance().analyse_upload(data, filename, single_cell=single_cell, add_to_slide=add_to_slide)


def form_flag(form, key: str) -> bool:
    """A checkbox or a scripted form field: 1, true, on or yes."""
    return str(form.get(key, "")).strip().lower() in ("1", "true", "on", "yes")


def request_capture(trigger: str = "web") -> None:
    """Queue a capture; BusyError while one runs."""
    appliance().request_capture(trigger)


def new_slide(slide_id: str | None) -> str:
    """Start a new slide (None: a dated ID); InputError for an ID that is not 1-64 safe characters."""
    return appliance().new_slide(slide_id or None)


def review_cell(cell_id: int, label: str, given_reviewer: str | None, note: str = "") -> dict:
    """Append a review of a cell: label 'blast', 'normal' or 'confirm' (the model's own label)."""
    cell = store().get_cell(cell_id)
    if cell is None:
        raise NotFoundError(f"no cell with id {cell_id}")
    label = cell["label"] if label == "confirm" else label
    return store().add_review(cell_id, str(label), reviewer(given_reviewer), str(note or ""))


def mark_slide_reviewed(slide_id: str, given_reviewer: str | None, confirm_unreviewed: int | str | None = None) -> dict:
    """Record that the slide was reviewed (by the logged-in user); returns its summary.

    While cells of the slide are unreviewed (the summary's `unreviewed`), it is refused (InputError, 400, saying
    how many and how to confirm) unless confirm_unreviewed equals that number now. A form field's text is
    taken too: "" or None = no confirmation, else a whole number.
    """
    if isinstance(confirm_unreviewed, str):
        text = confirm_unreviewed.strip()
        if text and not text.isdigit():
            raise InputError("confirm_unreviewed: give the number of unreviewed cells (a whole number)")
        confirm_unreviewed = int(text) if text else None
    store().mark_slide_reviewed(slide_id, by=reviewer(given_reviewer), confirm_unreviewed=confirm_unreviewed)
    return store().slide_summary(slide_id)


def slide_summary(slide_id: str) -> dict:
    summary = store().slide_summary(slide_id)
    if summary is None:
        raise NotFoundError(f"no slide {slide_id!r}")
    return summary


def status() -> dict:
    """Health, model card, latency per stage and disk: the status page and GET /api/status."""
    app = appliance()
    disk = shutil.disk_usage(app.store.data_dir)
    return {
        "health": app.health(),
        "model": model_card(),
        "latency_ms": latency_stats(),
        "disk": {
            "free_mb": round(disk.free / 1e6),
            "total_mb": round(disk.total / 1e6),
            "min_free_mb": app.store.min_free_mb,
        },
    }
