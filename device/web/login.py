"""Login and logout. Accounts live in `auth.json` (see device.accounts); logins are rate-limited."""

from __future__ import annotations

from flask import (
    Blueprint,
    current_app,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)

from device import accounts

LOGIN_RATE = "5/minute"


def _safe_next(target: str | None) -> str:
    # Only same-site paths: never "//host" or "http://host" (an open redirect).
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("pages.index")


def make_blueprint(limiter) -> Blueprint:
    """A fresh blueprint per app, so each app's rate-limit counters are its own."""
    bp = Blueprint("auth", __name__)

    @bp.route("/login", methods=["GET", "POST"])
    @limiter.limit(LOGIN_RATE, methods=["POST"], error_message="too many login attempts; wait a minute")
    def login():
        """Log in: form or JSON {username, password}; the JSON answer has a csrf_token. 5/minute per IP."""
        appliance = current_app.extensions["leukocam"]
        data_dir = appliance.store.data_dir
        no_accounts = not accounts.load_users(data_dir)
        if request.method == "GET":
            return render_template(
                "login.html", no_accounts=no_accounts, next=request.args.get("next", ""), error=None, health=None
            )
        wants_json = request.is_json
        body = (request.get_json(silent=True) or {}) if wants_json else request.form
        username, password = str(body.get("username", "")), str(body.get("password", ""))
        if not accounts.verify(data_dir, username, password):
            message = (
                "no account yet: run `leukocam set-password USER` on the appliance"
                if no_accounts
                else "wrong user name or password"
            )
            if wants_json:
                return jsonify({"error": message}), 401
            return render_template(
                "login.html", no_accounts=no_accounts, next=body.get("next", ""), error=message, health=None
            ), 401
        session.clear()  # a new session on login: no fixation
        session["user"] = username
        if wants_json:
            from flask_wtf.csrf import generate_csrf

            return jsonify({"user": username, "csrf_token": generate_csrf()})
        return redirect(_safe_next(body.get("next")))

    @bp.post("/logout")
    def logout():
        """Log out (ends the session)."""
        session.clear()
        return redirect(url_for("auth.login"))

    return bp
