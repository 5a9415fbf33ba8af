"""The JSON API under /api: everything the pages show and do, for scripts and the pages' own polling.

Non-browser clients: with the login gate on, POST /login (JSON) returns a
csrf_token; send it back as the X-CSRFToken header on every POST, with the
session cookie. GET /api/csrf gives a token for the current session too.

Each view declares its input and output with `@documented` (device.web.apidoc): the
same declaration checks the request and writes /api/openapi.json.
"""

from __future__ import annotations

from flask import Blueprint, current_app, g, jsonify, request, send_file, url_for
from flask_wtf.csrf import generate_csrf

from device import export
from device.errors import InputError, NotFoundError
from device.imaging import encode_image
from device.service import SLIDE_ID
from device.web import actions
from device.web import schemas as S
from device.web.apidoc import Body, Field, Reply, documented, form_args, json_args, openapi_spec, query_args
from device.web.common import appliance, enrich_capture, store

bp = Blueprint("api", __name__, url_prefix="/api")

REVIEWER = Field(
    "reviewer", "str", "who reviewed (ignored when logged in: the login is the reviewer)", max_length=64, nullable=True
)
SLIDE_ID_FIELD = Field(
    "id",
    "str",
    "1-64 letters, digits, '.', '_' or '-', not starting with '.'; absent: a dated ID",
    pattern="^" + SLIDE_ID.pattern + "$",
    nullable=True,
)
ID_QUERY = {"minimum": 0, "maximum": 2**63 - 1}


def _capture_json(cap: dict) -> dict:
    enrich_capture(cap)
    for cell in cap["cells"]:
        cell["crop_url"] = url_for("pages.image", kind="crop", item_id=cell["id"])
        cell["heatmap_url"] = url_for("pages.image", kind="heatmap", item_id=cell["id"])
    cap["field_url"] = url_for("pages.image", kind="field", item_id=cap["id"])
    return cap


def _file_response(data: bytes, mimetype: str):
    return current_app.response_class(data, mimetype=mimetype)


@bp.get("/health")
@documented(
    public=True,
    replies={
        200: Reply("healthy: with the login gate on and no login, only {ok}", {"anyOf": [S.HEALTH_PUBLIC, S.HEALTH]}),
        503: Reply("unhealthy (the worker stopped or the self-test failed)", {"anyOf": [S.HEALTH_PUBLIC, S.HEALTH]}),
    },
)
def health():
    """Liveness (public; 503 when unhealthy). With the login gate on, only {ok} until logged in."""
    if current_app.config["LEUKOCAM_LOGIN_REQUIRED"] and not g.get("user"):
        ok = appliance().is_ok()  # slide IDs, counts and paths are for logged-in users only
        return jsonify({"ok": ok}), (200 if ok else 503)
    h = appliance().health()
    return jsonify(h), (200 if h["ok"] else 503)


@bp.get("/csrf")
@documented(public=True, replies={200: Reply("a token for this session", S.CSRF)})
def csrf():
    """A CSRF token for this session (public)."""
    return jsonify({"csrf_token": generate_csrf(), "header": "X-CSRFToken"})


@bp.get("/status")
@documented(replies={200: Reply("health, model card, latency per stage, disk", S.STATUS)})
def status():
    """Health, model card, latency median/p95 per stage, disk."""
    return jsonify(actions.status())


@bp.get("/captures")
@documented(
    query=(
        Field("slide", "str", "only this slide", min_length=1),
        Field("label", "enum", "only captures with a cell of this label", choices=("blast", "normal")),
        Field("review", "enum", "pending: cells still to review; done: all reviewed", choices=("pending", "done")),
        Field("from", "date", "captured on or after this day"),
        Field("to", "date", "captured on or before this day"),
        Field("limit", "int", "page size", minimum=1, maximum=100, default=20),
        Field("offset", "int", "rows to skip", minimum=0, maximum=10**9, default=0),
    ),
    replies={200: Reply("one page of captures and the total", S.CAPTURE_PAGE)},
)
def captures():
    """Captures, newest first, filtered."""
    q = query_args()
    review = q["review"]
    total, rows = store().search_captures(
        slide_id=q["slide"],
        label=q["label"],
        needs_review=None if review is None else review == "pending",
        date_from=q["from"],
        date_to=q["to"],
        limit=q["limit"],
        offset=q["offset"],
    )
    return jsonify({"total": total, "limit": q["limit"], "offset": q["offset"], "captures": rows})


@bp.get("/captures/<int:capture_id>")
@documented(replies={200: Reply("the capture", S.CAPTURE)}, errors=(404,))
def capture(capture_id: int):
    """One capture: cells with box, probability, label, current verdict, image URLs; review history."""
    cap = store().get_capture(capture_id)
    if cap is None:
        raise NotFoundError(f"no capture with id {capture_id}")
    return jsonify(_capture_json(cap))


@bp.get("/latest")
@documented(replies={200: Reply("the newest capture id, the worker state and the last outcome", S.LATEST)})
def latest():
    """What the Live page polls: the newest capture id, the worker state and the last outcome."""
    app = appliance()
    rows = store().recent_captures(limit=1)
    return jsonify(
        {
            "latest_id": rows[0]["id"] if rows else None,
            "captures": store().count_captures(),
            "busy": app.busy,
            "last_outcome": None if app.last_outcome is None else app.last_outcome.__dict__,
            "last_error": app.last_error,
            "slide_id": app.slide_id,
        }
    )


@bp.post("/capture")
@documented(
    body=Body(
        (Field("trigger", "enum", "who asked (cli: `leukocam capture`)", choices=("web", "cli"), nullable=True),)
    ),
    replies={202: Reply("queued: poll GET /api/latest for the result", S.QUEUED)},
    errors=(409,),
)
def capture_post():
    """Queue a capture (202; 409 while one runs)."""
    # `leukocam capture` asks the running service, which owns the camera; it says so for provenance.
    actions.request_capture(json_args()["trigger"] or "web")
    return jsonify({"queued": True}), 202


@bp.get("/preview.jpg")
@documented(
    replies={200: Reply("a live preview frame", {"type": "string", "format": "binary"}, "image/jpeg")}, errors=(503,)
)
def preview():
    """Live preview frame (JPEG; 503 when the camera cannot give one)."""
    frame = appliance().camera.preview()  # CameraError (503) when it cannot
    resp = _file_response(encode_image(frame.image, "JPEG", quality=80), "image/jpeg")
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.get("/slides")
@documented(replies={200: Reply("slides, newest first, and the current one", S.SLIDES)})
def slides():
    """Slides with summaries and the current slide."""
    return jsonify({"current": appliance().slide_id, "slides": store().list_slides()})


@bp.get("/slides/<slide_id>")
@documented(replies={200: Reply("the slide", S.SLIDE_DETAIL)}, errors=(404,))
def slide(slide_id: str):
    """Slide summary: counts, blast fraction + 95% CI, review state, provenance."""
    summary = actions.slide_summary(slide_id)
    cells = store().slide_cells(slide_id)
    summary["reviewed_cells"] = sum(c["reviewed_label"] is not None for c in cells)
    summary["provenance"] = store().slide_provenance(slide_id)
    return jsonify(summary)


@bp.post("/slides")
@documented(
    body=Body((SLIDE_ID_FIELD,)),
    replies={201: Reply("the new current slide", S.CURRENT)},
    errors=(507,),
)
def new_slide():
    """Start a new slide: JSON {id} (optional; a dated ID otherwise)."""
    return jsonify({"current": actions.new_slide(json_args()["id"])}), 201


@bp.post("/slides/<slide_id>/reviewed")
@documented(
    body=Body(
        (
            REVIEWER,
            Field(
                "confirm_unreviewed",
                "int",
                "required while cells of the slide are unreviewed: their number now (the slide's `unreviewed`); "
                "any other number is refused",
                minimum=0,
                nullable=True,
            ),
        )
    ),
    replies={200: Reply("the slide", S.SLIDE)},
    errors=(404, 409, 507),
)
def slide_reviewed(slide_id: str):
    """Mark the slide reviewed (by the logged-in user); 409 while cells are unreviewed, unless confirmed."""
    body = json_args()
    return jsonify(actions.mark_slide_reviewed(slide_id, body["reviewer"], body["confirm_unreviewed"]))


@bp.get("/slides/<slide_id>/results.csv")
@documented(replies={200: Reply("one row per cell", {"type": "string"}, "text/csv")}, errors=(404,))
def slide_csv(slide_id: str):
    """One CSV row per cell: model result and current review."""
    actions.slide_summary(slide_id)
    resp = _file_response(export.slide_results_csv(store(), slide_id).encode(), "text/csv")
    resp.headers["Content-Disposition"] = f'attachment; filename="leukocam-{slide_id}.csv"'
    return resp


@bp.get("/slides/<slide_id>/results.json")
@documented(replies={200: Reply("summary, provenance, cells, reviews", S.RESULTS_JSON)}, errors=(404,))
def slide_json(slide_id: str):
    """Summary, provenance, cells and review history as JSON."""
    actions.slide_summary(slide_id)
    resp = _file_response(export.results_json_bytes(store(), slide_id), "application/json")
    resp.headers["Content-Disposition"] = f'attachment; filename="leukocam-{slide_id}.json"'
    return resp


@bp.get("/cells/<int:cell_id>")
@documented(replies={200: Reply("the cell and its reviews", S.CELL_DETAIL)}, errors=(404,))
def cell(cell_id: int):
    """One cell with its review history."""
    c = store().get_cell(cell_id)
    if c is None:
        raise NotFoundError(f"no cell with id {cell_id}")
    c["positive"], c["needs_review"] = bool(c["positive"]), bool(c["needs_review"])
    c["reviews"] = store().review_history(cell_id=cell_id)
    c["verdict"] = c["reviews"][-1]["label"] if c["reviews"] else c["label"]
    return jsonify(c)


@bp.post("/cells/<int:cell_id>/review")
@documented(
    body=Body(
        (
            Field(
                "label", "enum", "confirm: the model's own label", required=True, choices=("blast", "normal", "confirm")
            ),
            Field("note", "str", "free text", max_length=2000, nullable=True),
            REVIEWER,
        ),
        required=True,
    ),
    replies={201: Reply("the review row", S.REVIEW)},
    errors=(404, 507),
)
def review(cell_id: int):
    """Append a review of a cell."""
    body = json_args()
    row = actions.review_cell(cell_id, body["label"], body["reviewer"], body["note"] or "")
    return jsonify(row), 201


@bp.get("/reviews")
@documented(
    query=(
        Field("cell", "int", "one cell's reviews", **ID_QUERY),
        Field("capture", "int", "one capture's reviews", **ID_QUERY),
        Field("slide", "str", "one slide's reviews", min_length=1),
        Field("limit", "int", "at most this many (the newest)", minimum=1, maximum=10_000, default=1000),
    ),
    replies={200: Reply("review rows, oldest first", S.REVIEWS)},
)
def reviews():
    """Review history of one cell, capture or slide (the first given); with none, the newest reviews."""
    q = query_args()
    return jsonify(
        {
            "reviews": store().review_history(
                cell_id=q["cell"], capture_id=q["capture"], slide_id=q["slide"], limit=q["limit"]
            )
        }
    )


@bp.get("/export/dataset.zip")
@documented(
    query=(Field("slide", "str", "only these slides (repeat for several)", min_length=1, repeated=True),),
    replies={
        200: Reply("a zip of reviewed cells (C-NMC names)", {"type": "string", "format": "binary"}, "application/zip")
    },
    errors=(404,),
)
def export_dataset():
    """Reviewed cells as a training dataset (C-NMC names, reviewer's labels)."""
    slides = query_args()["slide"]
    for s in slides:
        actions.slide_summary(s)
    fh, n = export.export_dataset(store(), slides or None, version=_version())
    if n == 0:
        fh.close()
        raise NotFoundError("no reviewed cells to export yet: review cells first")
    name = f"leukocam-reviewed-{'-'.join(slides) if len(slides) == 1 else 'cells'}.zip"
    return send_file(fh, mimetype="application/zip", as_attachment=True, download_name=name)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("leukocam")
    except Exception:
        return ""


@bp.post("/upload")
@documented(
    body=Body(
        (
            Field("single_cell", "flag", "1: the image is one cell (a crop), not a field", default="0"),
            Field("add_to_slide", "flag", "1: count it in the current slide (else the slide 'uploads')", default="0"),
        ),
        media="multipart/form-data",
        required=True,
        files=("image",),
        description="a JPEG, PNG, BMP or TIFF",
    ),
    replies={201: Reply("stored like a capture (status ok or retake)", S.OUTCOME)},
    errors=(409, 507),
)
def upload():
    """Analyse an uploaded image like a capture."""
    form = form_args()
    f = request.files.get("image")
    if f is None:
        raise InputError("send the image as multipart form field 'image'")
    outcome = actions.upload(f.stream, f.filename or "upload", form["single_cell"], form["add_to_slide"])
    return jsonify(outcome.__dict__), 201


@bp.get("/openapi.json")
@documented(public=True, replies={200: Reply("this document", {"type": "object"})})
def openapi():
    """This description, generated from the routes' declarations (public)."""
    return jsonify(openapi_spec(_version()))
