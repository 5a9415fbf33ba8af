"""The dashboard: a Flask app factory over a running Appliance.

The factory starts nothing: the capture worker belongs to the service, and the
app only reads the store and enqueues captures. Images are served by id only,
never by a path from the client. Served by waitress (see `device.cli serve`),
never by Flask's debug server, whose reloader would open the camera twice.

Blueprints: `pages` (HTML), `api` (JSON under /api), `auth` (login/logout, in `login.py`; accounts in `device.accounts`).
Security lives here: the login gate, CSRF, rate limits, headers, error pages.
"""

from __future__ import annotations

import ipaddress
import json
import os

from flask import Flask, current_app, g, jsonify, redirect, render_template, request, url_for
from flask.json.provider import DefaultJSONProvider
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException
from werkzeug.routing import IntegerConverter

from device.accounts import LOCAL_HOSTS, decoy_hash, login_required_for
from device.errors import (
    BundleError,
    BusyError,
    CameraError,
    ConflictError,
    ImageError,
    InputError,
    LeukoCamError,
    NotFoundError,
    StoreFullError,
)
from device.web import api, login, pages
from device.web.sessions import SessionRegistry, persistent_key

STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


def create_app(appliance, *, login_required: bool | None = None, secure_cookies: bool | None = None) -> Flask:
    """Build the Flask app for one Appliance (or anything with the same attributes).

    Args:
        login_required: force the login gate on or off; by default it is on whenever
            `[web] host` is not a loopback address.
        secure_cookies: send the session cookie only over HTTPS (behind a TLS proxy);
            default from `[web] secure_cookies` if the config has it, else env LEUKOCAM_SECURE_COOKIES=1.
    """
    app = Flask(__name__)
    app.json = BoundedJSONProvider(app)
    app.url_map.converters["int"] = SQLiteInt
    web_cfg = appliance.config.web
    if login_required is None:
        login_required = login_required_for(web_cfg.host, web_cfg.login)
    if login_required:
        decoy_hash()  # made now, so the first login with an unknown name is not the slow one
    if secure_cookies is None:
        secure_cookies = (
            bool(getattr(web_cfg, "secure_cookies", False)) or os.environ.get("LEUKOCAM_SECURE_COOKIES") == "1"
        )
    app.config.update(
        MAX_CONTENT_LENGTH=web_cfg.max_upload_mb * 1024 * 1024,
        # Kept on disk (0600) so a restart logs nobody out; what a cookie means is checked server-side.
        SECRET_KEY=persistent_key(appliance.store.data_dir),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=secure_cookies,
        SESSION_COOKIE_NAME="leukocam_session",
        LEUKOCAM_LOGIN_REQUIRED=login_required,
        # We decide below which requests are checked; the token lives as long as the session.
        WTF_CSRF_CHECK_DEFAULT=False,
        WTF_CSRF_TIME_LIMIT=None,
        RATELIMIT_STORAGE_URI="memory://",
        RATELIMIT_HEADERS_ENABLED=True,
    )
    app.extensions["leukocam"] = appliance
    app.extensions["leukocam_sessions"] = SessionRegistry(appliance.store.data_dir)
    loopback_only = not login_required and web_cfg.host.strip().lower() in LOCAL_HOSTS
    csrf = CSRFProtect(app)
    limiter = Limiter(get_remote_address, app=app, storage_uri="memory://", default_limits=[])

    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(login.make_blueprint(limiter))

    @app.before_request
    def gate():
        if loopback_only and not _loopback_host(request.host):
            # DNS rebinding: a page from elsewhere, resolved to 127.0.0.1, must not reach the API.
            return _error(
                400,
                f"Host {request.host!r} is not a name this appliance answers to: it listens on this "
                f"machine only; open http://127.0.0.1:{web_cfg.port}/",
            )
        g.user = login.current_user()
        if request.routing_exception is not None:
            return None  # no such route or method: a 404 or 405 (with Allow) tells nothing worth a login
        if app.config["LEUKOCAM_LOGIN_REQUIRED"] and not g.user and not _public(app):
            if request.path.startswith("/api/") or "text/html" not in request.headers.get("Accept", ""):
                # a script, or an <img> of a page: told, not sent to a login form it cannot fill in
                message = "login required: POST /login with username and password first"
                return jsonify({"error": message, "status": 401}), 401
            return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
        if request.method in STATE_CHANGING and _csrf_applies(app):
            csrf.protect()  # raises CSRFError (400) with the reason
        return None

    @app.after_request
    def security_headers(resp):
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        resp.headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        resp.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        )
        if request.endpoint != "static":
            # Results, pages and exports are patient data: never kept by a shared cache or the browser.
            resp.headers.setdefault("Cache-Control", "private, no-store")
        return resp

    @app.errorhandler(CSRFError)
    def csrf_error(err):
        return _error(
            403,
            f"forged or expired request refused: {err.description} "
            "(reload the page; API clients send X-CSRFToken from GET /api/csrf)",
        )

    @app.errorhandler(HTTPException)
    def http_error(err):
        return _error(err.code or 500, err.description or err.name)

    @app.errorhandler(LeukoCamError)
    def domain_error(err):
        return _error(http_status(err), str(err))

    @app.errorhandler(405)
    def method_not_allowed(err):
        resp = _error(405, err.description or err.name)
        allowed = err.valid_methods or []
        return resp[0], 405, {"Allow": ", ".join(sorted(allowed))}

    @app.context_processor
    def globals_for_templates():
        return {
            "current_user": g.get("user"),
            "login_required": app.config["LEUKOCAM_LOGIN_REQUIRED"],
            # every page, at every width, says when results come from the synthetic demo model
            "synthetic_model": bool(getattr(appliance.bundle, "synthetic", False)),
        }

    return app


HTTP_STATUS: tuple[tuple[type[LeukoCamError], int], ...] = (
    (InputError, 400),
    (ImageError, 400),
    (NotFoundError, 404),
    (BusyError, 409),
    (ConflictError, 409),
    (StoreFullError, 507),
    (CameraError, 503),
    (BundleError, 503),
)
"""Domain error -> HTTP status, by type (first match); any other LeukoCamError is a 500."""


def http_status(err: LeukoCamError) -> int:
    return next((code for kind, code in HTTP_STATUS if isinstance(err, kind)), 500)


class SQLiteInt(IntegerConverter):
    """`<int:...>` ids stop at SQLite's largest integer: a bigger one is a 404, not an OverflowError."""

    def __init__(self, map, *args, **kwargs):  # noqa: A002 (werkzeug's name)
        kwargs.setdefault("max", 2**63 - 1)
        super().__init__(map, *args, **kwargs)


class BoundedJSONProvider(DefaultJSONProvider):
    """JSON bodies that nest too deeply are a 400 like any other malformed body, not a RecursionError."""

    def loads(self, s, **kwargs):
        try:
            return json.loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


def _loopback_host(host: str) -> bool:
    """True for a Host header naming this machine's loopback (any port)."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _public(app: Flask) -> bool:
    """Reachable without a login even with the gate on: the static assets, and what the API declares public
    (the login itself, liveness, the CSRF token, the API document; see device.web.apidoc)."""
    if request.endpoint == "static":
        return True
    doc = getattr(app.view_functions.get(request.endpoint or ""), "api_doc", None)
    return bool(doc and doc.public)


def _wants_json() -> bool:
    """A script (it sent JSON, or asks for JSON before HTML) gets JSON errors outside /api too."""
    if request.is_json:
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return (
        best == "application/json"
        and request.accept_mimetypes["application/json"] > request.accept_mimetypes["text/html"]
    )


def _csrf_applies(app: Flask) -> bool:
    """Which state-changing requests must carry a CSRF token.

    With the login gate on: all of them. Loopback-only without a login: every request
    a browser makes (browsers send Origin on every POST and Sec-Fetch-Site on every
    request, so a page from elsewhere cannot skip the check), but not local scripts
    such as `leukocam capture`, which send neither and have no cookie to abuse.
    """
    if app.config["LEUKOCAM_LOGIN_REQUIRED"]:
        return True
    h = request.headers
    return bool(h.get("Origin") or h.get("Sec-Fetch-Site") or request.cookies)


def _error(code: int, message: str):
    if request.path.startswith("/api/") or _wants_json():
        return jsonify({"error": message, "status": code}), code
    appliance = pages.appliance_or_none()
    may_see = g.get("user") or not current_app.config["LEUKOCAM_LOGIN_REQUIRED"]
    try:
        health = appliance.health() if appliance is not None and code < 500 and may_see else None
    except Exception:  # an error page must render even when the status cannot be read
        health = None
    return render_template("message.html", message=message, code=code, health=health), code
