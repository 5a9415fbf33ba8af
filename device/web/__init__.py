"""The dashboard: a Flask app factory over a running Appliance.

The factory starts nothing: the capture worker belongs to the service, and the
app only reads the store and enqueues captures. Images are served by id only,
never by a path from the client. Served by waitress (see `device.cli serve`),
never by Flask's debug server, whose reloader would open the camera twice.
"""

from __future__ import annotations

from flask import Flask, abort, jsonify, redirect, render_template, request, send_file, url_for

from device.errors import BusyError, ImageError, LeukoCamError
from device.imaging import encode_image


def create_app(appliance) -> Flask:
    """Build the Flask app for one Appliance (or anything with the same attributes)."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = appliance.config.web.max_upload_mb * 1024 * 1024
    app.extensions["leukocam"] = appliance
    store = appliance.store

    @app.after_request
    def security_headers(resp):
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        resp.headers.setdefault(
            "Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'"
        )
        return resp

    @app.get("/")
    def index():
        page = max(1, request.args.get("page", 1, type=int))
        per_page = 10
        captures = store.recent_captures(limit=per_page, offset=(page - 1) * per_page)
        for cap in captures:
            cap["cells"] = store.get_capture(cap["id"])["cells"]
        total = store.count_captures()
        return render_template("index.html", captures=captures, health=appliance.health(), page=page,
                               pages=max(1, -(-total // per_page)), total=total)

    @app.get("/captures/<int:capture_id>")
    def capture_page(capture_id: int):
        cap = store.get_capture(capture_id)
        if cap is None:
            abort(404, description=f"no capture with id {capture_id}")
        return render_template("capture.html", cap=cap, health=appliance.health())

    @app.post("/capture")
    def capture_form():
        try:
            appliance.request_capture("web")
        except BusyError as exc:
            return render_template("message.html", message=str(exc), health=appliance.health()), 409
        return redirect(url_for("index"))

    @app.get("/images/<kind>/<int:item_id>")
    def image(kind: str, item_id: int):
        path = store.image_file(kind, item_id)
        if path is None or not path.is_file():
            abort(404, description=f"no {kind} image with id {item_id}")
        return send_file(path, max_age=3600)

    # -- JSON API ------------------------------------------------------------------------------
    @app.get("/api/health")
    def api_health():
        health = appliance.health()
        return jsonify(health), (200 if health["ok"] else 503)

    @app.get("/api/captures")
    def api_captures():
        limit = min(100, max(1, request.args.get("limit", 20, type=int)))
        offset = max(0, request.args.get("offset", 0, type=int))
        return jsonify({"total": store.count_captures(), "captures": store.recent_captures(limit, offset)})

    @app.get("/api/captures/<int:capture_id>")
    def api_capture(capture_id: int):
        cap = store.get_capture(capture_id)
        if cap is None:
            return jsonify({"error": f"no capture with id {capture_id}"}), 404
        for cell in cap["cells"]:
            cell["crop_url"] = url_for("image", kind="crop", item_id=cell["id"])
            cell["heatmap_url"] = url_for("image", kind="heatmap", item_id=cell["id"])
        cap["field_url"] = url_for("image", kind="field", item_id=capture_id)
        return jsonify(cap)

    @app.post("/api/capture")
    def api_capture_post():
        # `leukocam capture` asks the running service, which owns the camera; it says so for provenance.
        trigger = "cli" if (request.get_json(silent=True) or {}).get("trigger") == "cli" else "web"
        try:
            appliance.request_capture(trigger)
        except BusyError as exc:
            return jsonify({"error": str(exc)}), 409
        return jsonify({"queued": True}), 202

    @app.get("/api/preview.jpg")
    def api_preview():
        camera = appliance.camera
        if not hasattr(camera, "preview"):
            return jsonify({"error": f"the {camera.name} camera has no preview"}), 404
        try:
            frame = camera.preview()
        except LeukoCamError as exc:
            return jsonify({"error": str(exc)}), 503
        resp = app.response_class(encode_image(frame.image, "JPEG", quality=80), mimetype="image/jpeg")
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.get("/api/slides")
    def api_slides():
        return jsonify({"current": appliance.slide_id, "slides": store.list_slides()})

    @app.get("/api/slides/<slide_id>")
    def api_slide(slide_id: str):
        summary = store.slide_summary(slide_id)
        if summary is None:
            return jsonify({"error": f"no slide {slide_id!r}"}), 404
        return jsonify(summary)

    @app.post("/api/slides")
    def api_new_slide():
        body = request.get_json(silent=True) or {}
        slide_id = body.get("id") or request.form.get("id") or None
        try:
            new_id = appliance.new_slide(slide_id)
        except ValueError as exc:
            return jsonify({"error": str(exc)}), 400
        return jsonify({"current": new_id}), 201

    @app.post("/slides")
    def new_slide_form():
        try:
            appliance.new_slide(request.form.get("id") or None)
        except ValueError as exc:
            return render_template("message.html", message=str(exc), health=appliance.health()), 400
        return redirect(url_for("index"))

    @app.post("/api/upload")
    def api_upload():
        f = request.files.get("image")
        if f is None:
            return jsonify({"error": "send the image as multipart form field 'image'"}), 400
        single = request.form.get("single_cell", "0") in ("1", "true", "on")
        try:
            outcome = appliance.analyse_upload(f.read(), f.filename or "upload", single_cell=single)
        except ImageError as exc:
            return jsonify({"error": str(exc)}), 400
        except LeukoCamError as exc:
            return jsonify({"error": str(exc)}), 507 if "disk" in str(exc) else 500
        return jsonify(outcome.__dict__), 201

    @app.errorhandler(404)
    @app.errorhandler(413)
    def client_error(err):
        if request.path.startswith("/api/"):
            return jsonify({"error": err.description}), err.code
        return render_template("message.html", message=err.description, health=None), err.code

    return app
