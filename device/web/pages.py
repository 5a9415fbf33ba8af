"""The HTML pages: Live, Captures gallery, Capture detail with review, Slides, Status, Upload."""

from __future__ import annotations

from flask import (
    Blueprint,
    abort,
    current_app,
    redirect,
    render_template,
    request,
    send_file,
    url_for,
)

from device.errors import InputError, NotFoundError
from device.web import actions
from device.web.apidoc import Field, Reply, documented
from device.web.common import (
    PER_PAGE,
    appliance,
    enrich_capture,
    gallery_filters,
    int_arg,
    slide_progress,
    store,
)

bp = Blueprint("pages", __name__)
ARCHIVAL = {"field": "field image of capture", "crop": "crop of cell"}
"""The images written after the result is stored (device.service.Appliance._after_result)."""
ARCHIVE_WAIT_S = 5.0
"""How long a request for an archival image of the last result, still being written, waits for it (the crop
PNGs take milliseconds, the 12 MP field JPEG a fraction of a second on a Pi)."""


def appliance_or_none():
    try:
        return current_app.extensions.get("leukocam")
    except RuntimeError:
        return None


def _latest():
    rows = store().recent_captures(limit=1)
    return enrich_capture(store().get_capture(rows[0]["id"])) if rows else None


def _progress() -> dict:
    slide_id = appliance().slide_id
    summary = store().slide_summary(slide_id) or {}
    return {"progress": slide_progress(slide_id), "pending": summary.get("needs_review", 0)}


@bp.get("/")
def index():
    """Live: the preview, the Capture button, the slide's guided count and the newest result (kept fresh by app.js)."""
    return render_template("live.html", health=appliance().health(), cap=_latest(), **_progress())


@bp.get("/fragments/latest")
def latest_fragment():
    return render_template("latest.html", cap=_latest())


@bp.get("/fragments/progress")
def progress_fragment():
    return render_template("progress.html", **_progress())


@bp.get("/captures")
def gallery():
    filters = gallery_filters(request.args)
    page = int_arg("page", 1, 1, 10**6)
    total, captures = store().search_captures(**filters, limit=PER_PAGE, offset=(page - 1) * PER_PAGE)
    args = {k: v for k, v in request.args.items() if k != "page" and v}
    return render_template(
        "gallery.html",
        captures=captures,
        total=total,
        page=page,
        pages=max(1, -(-total // PER_PAGE)),
        args=args,
        slides=store().slide_ids(500),
        health=appliance().health(),
    )


@bp.get("/captures/<int:capture_id>")
def capture_page(capture_id: int):
    cap = store().get_capture(capture_id)
    if cap is None:
        raise NotFoundError(f"no capture with id {capture_id}")
    field = store().image_file("field", capture_id)
    return render_template(
        "capture.html",
        cap=enrich_capture(cap),
        health=appliance().health(),
        field_on_disk=field is not None and field.is_file(),
    )


@bp.post("/capture")
def capture_form():
    actions.request_capture("web")
    return redirect(url_for("pages.index"))


@bp.post("/slides")
def new_slide_form():
    actions.new_slide(request.form.get("id") or None)
    return redirect(url_for("pages.index"))


@bp.get("/slides")
def slides():
    return render_template(
        "slides.html", slides=store().list_slides(200), current=appliance().slide_id, health=appliance().health()
    )


@bp.get("/slides/<slide_id>")
def slide_report(slide_id: str):
    """The slide report: the guided count and its decision, review state, provenance; prints cleanly."""
    summary = actions.slide_summary(slide_id)
    cells = store().slide_cells(slide_id, include_duplicates=True)
    counted = [c for c in cells if not c.get("duplicate_of")]
    return render_template(
        "slide.html",
        s=summary,
        progress=slide_progress(slide_id),
        reviewed=sum(c["reviewed_label"] is not None for c in counted),
        idx_of={c["cell_id"]: c["idx"] for c in cells},
        prov=store().slide_provenance(slide_id),
        reviews=store().review_history(slide_id=slide_id),
        health=appliance().health(),
    )


@bp.post("/slides/<slide_id>/reviewed")
def slide_reviewed_form(slide_id: str):
    actions.mark_slide_reviewed(slide_id, request.form.get("reviewer"), request.form.get("confirm_unreviewed"))
    return redirect(url_for("pages.slide_report", slide_id=slide_id))


@bp.post("/cells/<int:cell_id>/review")
def review_form(cell_id: int):
    row = actions.review_cell(cell_id, request.form.get("label", ""), request.form.get("reviewer"))
    return redirect(url_for("pages.capture_page", capture_id=row["capture_id"], _anchor=f"cell-{cell_id}"))


@bp.get("/status")
def status():
    s = actions.status()
    return render_template("status.html", health=s["health"], model=s["model"], latency=s["latency_ms"], disk=s["disk"])


@bp.route("/upload", methods=["GET", "POST"])
def upload():
    if request.method == "GET":
        return render_template("upload.html", health=appliance().health())
    f = request.files.get("image")
    if f is None:
        raise InputError("choose an image file to upload")
    outcome = actions.upload(
        f.stream,
        f.filename or "",
        actions.form_flag(request.form, "single_cell"),
        actions.form_flag(request.form, "add_to_slide"),
    )
    return redirect(url_for("pages.capture_page", capture_id=outcome.capture_id))


@bp.get("/images/<kind>/<int:item_id>")
@documented(
    path=(
        Field("kind", "enum", "field (capture id), crop or heatmap (cell id)", choices=("field", "crop", "heatmap")),
    ),
    replies={
        200: Reply("the image: field and heatmap JPEG, crop PNG", {"type": "string", "format": "binary"}, "image/*"),
    },
    errors=(404,),
    html_errors=True,
)
def image(kind: str, item_id: int):
    """A stored image by id: kind is field (capture id), crop or heatmap (cell id)."""
    path = store().image_file(kind, item_id)
    if path is not None and not path.is_file() and kind in ARCHIVAL:
        # The archival copies (crop PNGs, field JPEG) are written just after the result is stored: a page
        # opened at once may ask for one a moment early.
        appliance().wait_for_image(kind, ARCHIVE_WAIT_S)
    if path is None or not path.is_file():
        if path is not None and kind in ARCHIVAL:
            abort(
                404,
                description=(
                    f"the {ARCHIVAL[kind]} {item_id} is not on disk: it is written just after "
                    "the result (reload in a moment), or it was lost in a power cut or a full disk"
                ),
            )
        abort(404, description=f"no {kind} image with id {item_id}")
    resp = send_file(path, max_age=3600, conditional=True)
    # Stored images never change, so the browser may keep them, but never a shared cache; with the
    # login gate on, not even the browser (they are patient data).
    login_on = current_app.config["LEUKOCAM_LOGIN_REQUIRED"]
    resp.headers["Cache-Control"] = "private, no-store" if login_on else "private, max-age=3600"
    return resp
