"""Login and logout. Accounts live in `auth.json` (see device.accounts); logins are rate-limited.

The session cookie carries only a token; `device.web.sessions` says whose it is, until logout or expiry.
"""

from __future__ import annotations

from urllib.parse import urlsplit

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
from device.web import schemas as S
from device.web.apidoc import Body, Field, Reply, documented

LOGIN_RATE = "5/minute"
MAX_NEXT = 2000


def registry():
    return current_app.extensions["leukocam_sessions"]


def current_user() -> str | None:
    """Who this request is logged in as; a cookie whose session ended (logout, expiry) is dropped."""
    token = session.get("sid")
    if not token:
        return None
    user = registry().user_of(token)
    if user is None:
        session.clear()
    return user


def safe_next(target) -> str:
    """Where to go after login: a path on this site only.

    Browsers drop tabs and newlines from URLs and read a backslash as a slash, so "/\t/evil.example"
    would become "//evil.example" (another site): any control character, white space or backslash,
    a leading "//", or anything with a scheme or host sends the user to the start page instead.
    """
    if (
        isinstance(target, str)
        and 0 < len(target) <= MAX_NEXT
        and target.startswith("/")
        and not target.startswith("//")
        and target.isprintable()
        and not any(ch.isspace() or ch == "\\" for ch in target)
    ):
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc:
            return target
    return url_for("pages.index")


def make_blueprint(limiter) -> Blueprint:
    """A fresh blueprint per app, so each app's rate-limit counters are its own."""
    bp = Blueprint("auth", __name__)

    @bp.route("/login", methods=["GET", "POST"])
    @limiter.limit(LOGIN_RATE, methods=["POST"], error_message="too many login attempts; wait a minute")
    @documented(
        public=True,
        body=Body(
            (
                Field("username", "str", "the account name", required=True),
                Field("password", "str", "its password", required=True),
                Field("next", "str", "where a browser goes after login (same-site path)", nullable=True),
            ),
            required=True,
            description="JSON from scripts; the login form posts the same fields",
        ),
        replies={
            200: Reply(
                "POST with JSON: logged in (GET: the login page)",
                S.LOGGED_IN,
                also={"text/html": {"type": "string"}},
            ),
            302: Reply("POST (form): logged in, on to `next`", None, ""),
        },
        errors=(401, 429, 507),
        html_errors=True,
    )
    def login():
        """Log in: form or JSON {username, password}; the JSON answer has a csrf_token. 5/minute per IP."""
        appliance = current_app.extensions["leukocam"]
        data_dir = appliance.store.data_dir
        no_accounts = not accounts.load_users(data_dir)
        if request.method == "GET":
            return render_template(
                "login.html",
                no_accounts=no_accounts,
                next=request.args.get("next", ""),
                error=None,
                health=None,
                set_password_command=appliance.config.command("set-password", "USER"),
            )
        wants_json = request.is_json
        body = request.get_json(silent=True) if wants_json else request.form
        if not hasattr(body, "get"):  # JSON that is not an object
            body = {}
        username, password = str(body.get("username", "")), str(body.get("password", ""))
        if not accounts.verify(data_dir, username, password):
            message = (
                f"no account yet: on the appliance run `{appliance.config.command('set-password', 'USER')}`"
                if no_accounts
                else "wrong user name or password"
            )
            if wants_json:
                return jsonify({"error": message, "status": 401}), 401
            return render_template(
                "login.html",
                no_accounts=no_accounts,
                next=body.get("next", ""),
                error=message,
                health=None,
                set_password_command=appliance.config.command("set-password", "USER"),
            ), 401
        registry().end(session.get("sid"))
        session.clear()  # a new session (and CSRF token) on every login: no fixation
        session["sid"] = registry().create(username)
        if wants_json:
            from flask_wtf.csrf import generate_csrf

            return jsonify({"user": username, "csrf_token": generate_csrf()})
        return redirect(safe_next(body.get("next")))

    @bp.post("/logout")
    @documented(public=True, replies={302: Reply("logged out: on to the login page", None, "")}, html_errors=True)
    def logout():
        """Log out: the session ends on the server too, so an old copy of the cookie stops working."""
        registry().end(session.get("sid"))
        session.clear()
        return redirect(url_for("auth.login"))

    return bp
