"""The JSON API under /api: everything the pages show and do, for scripts and the pages' own polling.

Non-browser clients: with the login gate on, POST /login (JSON) returns a
csrf_token; send it back as the X-CSRFToken header on every POST, with the
session cookie. GET /api/csrf gives a token for the current session too.
"""

from __future__ import annotations

import inspect
import re

from flask import Blueprint, current_app, g, jsonify, request, send_file, url_for
from flask_wtf.csrf import generate_csrf

from device import export
from device.errors import InputError, NotFoundError
from device.imaging import encode_image
from device.web import actions
from device.web.common import (
    appliance,
    enrich_capture,
    gallery_filters,
    id_value,
    int_arg,
    json_object,
    store,
    text_field,
)

bp = Blueprint("api", __name__, url_prefix="/api")


def err(message: str, code: int):
    """A JSON error for what is not a domain error (domain errors go to the app's handler by type)."""
    return jsonify({"error": message, "status": code}), code


def _capture_json(cap: dict) -> dict:
    enrich_capture(cap)
    for cell in cap["cells"]:
        cell["crop_url"] = url_for("pages.image", kind="crop", item_id=cell["id"])
        cell["heatmap_url"] = url_for("pages.image", kind="heatmap", item_id=cell["id"])
    cap["field_url"] = url_for("pages.image", kind="field", item_id=cap["id"])
    return cap


@bp.get("/health")
def health():
    """Liveness (public; 503 when unhealthy). With the login gate on, only {ok} until logged in."""
    if current_app.config["LEUKOCAM_LOGIN_REQUIRED"] and not g.get("user"):
        ok = appliance().is_ok()  # slide IDs, counts and paths are for logged-in users only
        return jsonify({"ok": ok}), (200 if ok else 503)
    h = appliance().health()
    return jsonify(h), (200 if h["ok"] else 503)


@bp.get("/csrf")
def csrf():
    """A CSRF token for this session (public)."""
    return jsonify({"csrf_token": generate_csrf(), "header": "X-CSRFToken"})


@bp.get("/status")
def status():
    """Health, model card, latency median/p95 per stage, disk."""
    return jsonify(actions.status())


@bp.get("/captures")
def captures():
    """Captures, newest first.

    Query: ?slide= &label=blast|normal &review=pending|done &from= &to= (YYYY-MM-DD) &limit= &offset=."""
    filters = gallery_filters(request.args)
    limit, offset = int_arg("limit", 20, 1, 100), int_arg("offset", 0, 0, 10**9)
    total, rows = store().search_captures(**filters, limit=limit, offset=offset)
    return jsonify({"total": total, "limit": limit, "offset": offset, "captures": rows})


@bp.get("/captures/<int:capture_id>")
def capture(capture_id: int):
    """One capture: cells with box, probability, label, current verdict, image URLs; review history."""
    cap = store().get_capture(capture_id)
    if cap is None:
        raise NotFoundError(f"no capture with id {capture_id}")
    return jsonify(_capture_json(cap))


@bp.get("/latest")
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
def capture_post():
    """Queue a capture (202; 409 while one runs)."""
    # `leukocam capture` asks the running service, which owns the camera; it says so for provenance.
    trigger = "cli" if json_object().get("trigger") == "cli" else "web"
    actions.request_capture(trigger)
    return jsonify({"queued": True}), 202


@bp.get("/preview.jpg")
def preview():
    """Live preview frame (JPEG; 503 when the camera cannot give one)."""
    frame = appliance().camera.preview()  # CameraError (503) when it cannot
    resp = bp_response(encode_image(frame.image, "JPEG", quality=80), "image/jpeg")
    resp.headers["Cache-Control"] = "no-store"
    return resp


def bp_response(data: bytes, mimetype: str):
    from flask import current_app

    return current_app.response_class(data, mimetype=mimetype)


@bp.get("/slides")
def slides():
    """Slides with summaries and the current slide."""
    return jsonify({"current": appliance().slide_id, "slides": store().list_slides()})


@bp.get("/slides/<slide_id>")
def slide(slide_id: str):
    """Slide summary: counts, blast fraction + 95% CI, review state, provenance."""
    summary = actions.slide_summary(slide_id)
    cells = store().slide_cells(slide_id)
    summary["reviewed_cells"] = sum(c["reviewed_label"] is not None for c in cells)
    summary["provenance"] = store().slide_provenance(slide_id)
    return jsonify(summary)


@bp.post("/slides")
def new_slide():
    """Start a new slide: JSON {id} (optional; a dated ID otherwise)."""
    slide_id = text_field(json_object(), "id") or request.form.get("id") or None
    return jsonify({"current": actions.new_slide(slide_id)}), 201


@bp.post("/slides/<slide_id>/reviewed")
def slide_reviewed(slide_id: str):
    """Mark the slide reviewed (by the logged-in user)."""
    return jsonify(actions.mark_slide_reviewed(slide_id, text_field(json_object(), "reviewer")))


@bp.get("/slides/<slide_id>/results.csv")
def slide_csv(slide_id: str):
    """One CSV row per cell: model result and current review."""
    actions.slide_summary(slide_id)
    resp = bp_response(export.slide_results_csv(store(), slide_id).encode(), "text/csv")
    resp.headers["Content-Disposition"] = f'attachment; filename="leukocam-{slide_id}.csv"'
    return resp


@bp.get("/slides/<slide_id>/results.json")
def slide_json(slide_id: str):
    """Summary, provenance, cells and review history as JSON."""
    actions.slide_summary(slide_id)
    resp = bp_response(export.results_json_bytes(store(), slide_id), "application/json")
    resp.headers["Content-Disposition"] = f'attachment; filename="leukocam-{slide_id}.json"'
    return resp


@bp.get("/cells/<int:cell_id>")
def cell(cell_id: int):
    """One cell with its review history."""
    c = store().get_cell(cell_id)
    if c is None:
        raise NotFoundError(f"no cell with id {cell_id}")
    c["reviews"] = store().review_history(cell_id=cell_id)
    c["verdict"] = c["reviews"][-1]["label"] if c["reviews"] else c["label"]
    return jsonify(c)


@bp.post("/cells/<int:cell_id>/review")
def review(cell_id: int):
    """Append a review: JSON {label: blast|normal|confirm, note?}."""
    body = json_object(required='send JSON: {"label": "blast" | "normal" | "confirm"}')
    row = actions.review_cell(
        cell_id, text_field(body, "label") or "", text_field(body, "reviewer"), text_field(body, "note") or ""
    )
    return jsonify(row), 201


@bp.get("/reviews")
def reviews():
    """Review history: ?cell= | ?capture= | ?slide=."""
    for key, kw in (("cell", "cell_id"), ("capture", "capture_id"), ("slide", "slide_id")):
        if request.args.get(key):
            value = request.args[key] if key == "slide" else id_value(request.args[key], key)
            return jsonify({"reviews": store().review_history(**{kw: value})})
    raise InputError("give one of ?cell=, ?capture= or ?slide=")


@bp.get("/export/dataset.zip")
def export_dataset():
    """Reviewed cells as a training dataset (C-NMC names, reviewer's labels); ?slide= repeatable."""
    slides = request.args.getlist("slide")
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
def upload():
    """Analyse an uploaded image: multipart 'image'; 'single_cell'=1 for one cell; 'add_to_slide'=1 to count
    it in the current slide (else it is stored under the slide "uploads")."""
    f = request.files.get("image")
    if f is None:
        raise InputError("send the image as multipart form field 'image'")
    outcome = actions.upload(
        f.stream,
        f.filename or "upload",
        actions.form_flag(request.form, "single_cell"),
        actions.form_flag(request.form, "add_to_slide"),
    )
    return jsonify(outcome.__dict__), 201


@bp.get("/openapi.json")
def openapi():
    """This description, generated from the routes and their docstrings (public)."""
    return jsonify(openapi_spec())


DOCUMENTED_BLUEPRINTS = ("api.", "auth.")
"""The JSON API and the login, plus the stored images (pages.image): what scripts use."""
_PARAM = re.compile(r"<(?:(\w+):)?(\w+)>")


def openapi_spec() -> dict:
    """OpenAPI 3 for every documented route, generated from the URL map and the views' docstrings."""
    from device.web import PUBLIC_ENDPOINTS

    paths: dict = {}
    for rule in sorted(current_app.url_map.iter_rules(), key=lambda r: r.rule):
        if not (rule.endpoint.startswith(DOCUMENTED_BLUEPRINTS) or rule.endpoint == "pages.image"):
            continue
        doc = inspect.getdoc(current_app.view_functions[rule.endpoint]) or ""
        summary, _, description = doc.partition("\n")
        path = _PARAM.sub(r"{\2}", rule.rule)
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "integer" if conv == "int" else "string"}}
            for conv, name in _PARAM.findall(rule.rule)
        ]
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            op = {
                "operationId": f"{rule.endpoint}.{method.lower()}",
                "summary": summary.strip(),
                "responses": {
                    "200": {"description": "OK"},
                    "default": {"description": "an error: JSON {error: reason, status}"},
                },
            }
            if description.strip():
                op["description"] = description.strip()
            op_params = list(params)
            if method == "POST":
                op_params.append(
                    {
                        "name": "X-CSRFToken",
                        "in": "header",
                        "required": False,
                        "description": "required with the login gate on, and from browsers",
                        "schema": {"type": "string"},
                    }
                )
            if op_params:
                op["parameters"] = op_params
            if rule.endpoint in PUBLIC_ENDPOINTS:
                op["security"] = []
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "LeukoCam dashboard API",
            "version": _version() or "0",
            "description": "Research screening aid, not a diagnosis. With the login gate on, every endpoint "
            "except the public ones needs the session cookie from POST /login, and every POST "
            "needs the X-CSRFToken header.",
        },
        "components": {"securitySchemes": {"session": {"type": "apiKey", "in": "cookie", "name": "leukocam_session"}}},
        "security": [{"session": []}],
        "paths": paths,
    }
