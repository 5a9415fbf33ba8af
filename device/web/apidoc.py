"""The JSON API's contract, declared once: the views validate their input with it and
`/api/openapi.json` is generated from it, so the document cannot drift from the code.

A view says what it takes and returns with `@documented(...)`: query fields, a JSON or
multipart body, and its responses. `query_args()` and `json_args()` parse the request with
the same `Field`s that write the document, and refuse what the document forbids with a 400
that names the field. `openapi_spec()` walks the URL map: path parameters come from the
route converters, security from the running mode (login gate on or off).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from flask import current_app, request

from device.errors import InputError

MAX_ID = 2**63 - 1
"""SQLite's largest integer: ids beyond it cannot exist."""
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_INT = re.compile(r"[+-]?\d{1,30}")


@dataclass(frozen=True)
class Field:
    """One query parameter or JSON body member: its type and limits, for the document and the parser."""

    name: str
    kind: str
    """"int", "str", "date" (YYYY-MM-DD), "enum" (one of `choices`), "flag" (1/0, true/false, on/off, yes/no)."""
    description: str = ""
    required: bool = False
    minimum: int | None = None
    maximum: int | None = None
    default: Any = None
    choices: tuple[str, ...] = ()
    pattern: str | None = None
    min_length: int | None = None
    max_length: int | None = None
    repeated: bool = False
    """A query parameter that may be given more than once (a list)."""
    nullable: bool = False
    """A JSON member that may be null (same as absent)."""

    def schema(self) -> dict:
        if self.kind == "int":
            out: dict = {"type": "integer", "format": "int64"}
            if self.minimum is not None:
                out["minimum"] = self.minimum
            if self.maximum is not None:
                out["maximum"] = self.maximum
        elif self.kind == "date":
            out = {"type": "string", "format": "date", "pattern": r"^\d{4}-\d{2}-\d{2}$"}
        elif self.kind in ("enum", "flag"):
            out = {"type": "string", "enum": list(self.choices or FLAG_VALUES)}
        else:
            out = {"type": "string"}
            if self.pattern:
                out["pattern"] = self.pattern
            if self.min_length is not None:
                out["minLength"] = self.min_length
            if self.max_length is not None:
                out["maxLength"] = self.max_length
        if self.default is not None:
            out["default"] = self.default
        if self.description:
            out["description"] = self.description
        if self.nullable:
            out = {"anyOf": [out, {"type": "null"}]}
        if self.repeated:
            out = {"type": "array", "items": out}
        return out

    def parse(self, raw: Any, *, from_text: bool) -> Any:
        """The value as the view uses it; InputError naming the field when it breaks the declaration."""
        if raw is None:
            if self.required:
                raise InputError(f"{self.name}: required")
            return (self.default in FLAG_TRUE) if self.kind == "flag" else self.default
        if self.kind == "int":
            return self._int(raw, from_text)
        if not isinstance(raw, str):
            raise InputError(f"{self.name}: expected text, got {type(raw).__name__}")
        if self.kind == "date":
            return self._date(raw)
        if self.kind == "flag":
            if raw.strip().lower() not in FLAG_VALUES:
                raise InputError(f"{self.name}: use 1 or 0 (or true/false, on/off, yes/no)")
            return raw.strip().lower() in FLAG_TRUE
        if self.kind == "enum":
            if raw not in self.choices:
                raise InputError(f"{self.name}: use {' or '.join(self.choices)}")
            return raw
        if self.min_length is not None and len(raw) < self.min_length:
            raise InputError(f"{self.name}: at least {self.min_length} character(s)")
        if self.max_length is not None and len(raw) > self.max_length:
            raise InputError(f"{self.name}: at most {self.max_length} characters")
        if self.pattern and not re.search(self.pattern, raw):
            raise InputError(f"{self.name}: {self.description or 'not in the expected form'}")
        return raw

    def _int(self, raw: Any, from_text: bool) -> int:
        if from_text and isinstance(raw, str) and _INT.fullmatch(raw):
            value = int(raw)
        elif not from_text and isinstance(raw, int) and not isinstance(raw, bool):
            value = raw
        elif not from_text and isinstance(raw, float) and raw.is_integer():
            value = int(raw)  # JSON Schema counts 3.0 as an integer, and so do we
        else:
            raise InputError(f"{self.name}: expected a whole number")
        low = self.minimum if self.minimum is not None else -MAX_ID
        high = self.maximum if self.maximum is not None else MAX_ID
        if not low <= value <= high:
            raise InputError(f"{self.name}: expected a whole number from {low} to {high}")
        return value

    def _date(self, raw: str) -> str:
        try:
            date.fromisoformat(raw)
        except ValueError:
            raise InputError(f"{self.name}: use a date as YYYY-MM-DD") from None
        if not _DAY.fullmatch(raw):
            raise InputError(f"{self.name}: use a date as YYYY-MM-DD")
        return raw


FLAG_TRUE = ("1", "true", "on", "yes")
FLAG_VALUES = (*FLAG_TRUE, "0", "false", "off", "no")


@dataclass(frozen=True)
class Body:
    """A request body: JSON object members (`fields`), or multipart form fields with `files`."""

    fields: tuple[Field, ...] = ()
    media: str = "application/json"
    required: bool = False
    files: tuple[str, ...] = ()
    """Multipart members that are files (binary)."""
    description: str = ""

    def schema(self) -> dict:
        props = {f.name: f.schema() for f in self.fields}
        props.update({name: {"type": "string", "format": "binary"} for name in self.files})
        required = [f.name for f in self.fields if f.required] + list(self.files)
        out: dict = {"type": "object", "properties": props}
        if required:
            out["required"] = required
        return out


@dataclass(frozen=True)
class Reply:
    """One documented response."""

    description: str
    schema: dict | None = None
    media: str = "application/json"
    also: dict = field(default_factory=dict)
    """Other media types the same status can come as: {media: schema}."""


@dataclass(frozen=True)
class ApiDoc:
    query: tuple[Field, ...] = ()
    path: tuple[Field, ...] = ()
    """Path parameters that need more than their converter says (an enum of image kinds, say)."""
    body: Body | None = None
    replies: dict[int, Reply] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    """Error statuses beyond the ones every route has (400; 401 with the login gate; 413 for bodies)."""
    public: bool = False
    """Reachable without a login even with the login gate on."""
    html_errors: bool = False
    """Errors come back as the HTML error page (routes outside /api)."""


def documented(**kwargs) -> Callable:
    """Attach an `ApiDoc` to a view function."""
    doc = ApiDoc(**kwargs)

    def wrap(view):
        view.api_doc = doc
        return view

    return wrap


def _doc() -> ApiDoc:
    view = current_app.view_functions.get(request.endpoint or "")
    doc = getattr(view, "api_doc", None)
    if doc is None:
        raise RuntimeError(f"{request.endpoint} has no @documented declaration")
    return doc


def query_args() -> dict:
    """The request's query parameters, parsed and checked against the view's declaration."""
    out = {}
    for f in _doc().query:
        if f.repeated:
            out[f.name] = [f.parse(v, from_text=True) for v in request.args.getlist(f.name)]
        else:
            out[f.name] = f.parse(request.args.get(f.name), from_text=True)
    return out


def json_args() -> dict:
    """The request's JSON body, parsed and checked against the view's declaration ({} for no body)."""
    body = _doc().body
    assert body is not None and body.media == "application/json"
    if not request.is_json or not request.get_data(cache=True).strip():
        if body.required:
            raise InputError(f"send a JSON object: {_members(body)}")
        data: Any = {}
    else:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise InputError(f"send a JSON object: {_members(body)}")
    return {f.name: f.parse(data.get(f.name), from_text=False) for f in body.fields}


def form_args() -> dict:
    """A multipart body's plain fields, checked against the view's declaration (files are read by the view)."""
    body = _doc().body
    assert body is not None
    return {f.name: f.parse(request.form.get(f.name), from_text=True) for f in body.fields}


def _members(body: Body) -> str:
    return "{" + ", ".join(f"{f.name}{'' if f.required else '?'}" for f in body.fields) + "}"


# -- the document ----------------------------------------------------------------------------------

ERROR = {
    "type": "object",
    "required": ["error", "status"],
    "properties": {
        "error": {"type": "string", "description": "what was wrong and what to do"},
        "status": {"type": "integer"},
    },
}
COMMON_ERRORS = {
    400: "bad input: the error names the field (or the Host header is not a name this appliance answers to)",
    401: "login required: POST /login first and send the session cookie",
    403: "forged or expired request: the X-CSRFToken header is missing or not this session's",
    404: "no such record",
    405: "method not allowed (the Allow header lists the methods)",
    409: "busy (a capture or upload is already running), or the record's state refuses it now (a slide with "
    "unreviewed cells: confirm their number)",
    413: "the body is larger than [web] max_upload_mb",
    429: "too many login attempts: wait a minute",
    503: "the camera, the model or the worker is not working",
    507: "disk full: nothing was written; export and delete old results",
}
_PARAM = re.compile(r"<(?:(\w+)(?:\([^)]*\))?:)?(\w+)>")
DOCUMENTED_PREFIXES = ("api.", "auth.")
"""The JSON API and the login, plus the stored images (pages.image): what scripts use."""


def openapi_spec(version: str) -> dict:
    """OpenAPI 3.1 for every documented route of the running app, true for its mode."""
    login_on = current_app.config["LEUKOCAM_LOGIN_REQUIRED"]
    paths: dict = {}
    for rule in sorted(current_app.url_map.iter_rules(), key=lambda r: r.rule):
        view = current_app.view_functions[rule.endpoint]
        doc = getattr(view, "api_doc", None)
        if doc is None:
            continue
        path = _PARAM.sub(r"{\2}", rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = _operation(rule, view, doc, method, login_on)
    schemes = {
        "session": {
            "type": "apiKey",
            "in": "cookie",
            "name": current_app.config["SESSION_COOKIE_NAME"],
            "description": "the session cookie (set by GET /api/csrf, and a logged-in one by POST /login)",
        },
        "csrf": {
            "type": "apiKey",
            "in": "header",
            "name": "X-CSRFToken",
            "description": "the csrf_token from POST /login or GET /api/csrf, for this session",
        },
    }
    mode = (
        'The login gate is ON (this dashboard listens beyond this machine, or [web] login = "always"): every '
        "operation except the public ones needs the session cookie from POST /login, and every POST needs the "
        "X-CSRFToken header as well."
        if login_on
        else "The login gate is OFF (this dashboard listens on this machine only): no login. A POST from a browser "
        "(it sends Origin, Sec-Fetch-Site or a cookie) needs the X-CSRFToken header from GET /api/csrf; a "
        "script that sends none of those, such as `leukocam capture`, needs nothing."
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "LeukoCam dashboard API",
            "version": version or "0",
            "description": "Research screening aid, not a diagnosis. " + mode,
        },
        "servers": [{"url": "/"}],
        "components": {"securitySchemes": schemes, "schemas": {"Error": ERROR}},
        "security": [{"session": []}] if login_on else [],
        "paths": paths,
    }


def _operation(rule, view, doc: ApiDoc, method: str, login_on: bool) -> dict:
    summary, _, description = (inspect.getdoc(view) or "").partition("\n")
    op: dict = {"operationId": f"{rule.endpoint}.{method.lower()}", "summary": summary.strip()}
    if description.strip():
        op["description"] = description.strip()
    params = _path_params(rule, doc) + [
        {"name": f.name, "in": "query", "required": f.required, "schema": f.schema()}
        | ({"explode": True} if f.repeated else {})
        for f in (doc.query if method == "GET" else ())
    ]
    if params:
        op["parameters"] = params
    if doc.body is not None and method == "POST":
        op["requestBody"] = {
            "required": doc.body.required,
            "content": {doc.body.media: {"schema": doc.body.schema()}},
        }
        if doc.body.description:
            op["requestBody"]["description"] = doc.body.description
    op["responses"] = _responses(doc, method, login_on)
    security = _security(doc, method, login_on)
    if security is not None:
        op["security"] = security
    return op


def _path_params(rule, doc: ApiDoc) -> list[dict]:
    declared = {f.name: f for f in doc.path}
    out = []
    for conv, name in _PARAM.findall(rule.rule):
        if name in declared:
            schema = declared[name].schema()
        elif conv == "int":
            schema = {"type": "integer", "format": "int64", "minimum": 0, "maximum": MAX_ID}
        else:
            schema = {"type": "string", "minLength": 1}
        out.append({"name": name, "in": "path", "required": True, "schema": schema})
    return out


def _responses(doc: ApiDoc, method: str, login_on: bool) -> dict:
    out: dict = {}
    for code, reply in doc.replies.items():
        entry: dict = {"description": reply.description}
        content = {reply.media: reply.schema or {}} if reply.media else {}
        content.update(reply.also)
        if content:
            entry["content"] = {media: {"schema": schema} for media, schema in content.items()}
        out[str(code)] = entry
    codes = {400, *doc.errors}
    if login_on and not doc.public:
        codes.add(401)
        if doc.html_errors:  # a browser asking for a page (Accept: text/html) goes to the login form instead
            out.setdefault("302", {"description": "not logged in, from a browser: redirect to /login"})
    if method == "POST":
        codes.add(403)  # CSRF: every POST with the login gate on, and browsers' POSTs without it
        if doc.body is not None:
            codes.add(413)
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    if doc.html_errors:  # the error page for browsers; JSON for clients that send or accept JSON
        content["text/html"] = {"schema": {"type": "string"}}
    for code in sorted(codes):
        out.setdefault(str(code), {"description": COMMON_ERRORS[code], "content": content})
    return out


def _security(doc: ApiDoc, method: str, login_on: bool) -> list | None:
    """None: the document's default. Login gate on: the cookie, plus the CSRF header on POST. Off: nothing,
    or the CSRF header for browsers (an alternative: a script without browser headers needs nothing)."""
    post = method == "POST"
    if login_on:
        if doc.public:  # the CSRF token is bound to a session: the cookie from GET /api/csrf comes with it
            return [{"session": [], "csrf": []}] if post else []
        return [{"session": [], "csrf": []}] if post else None
    return [{}, {"csrf": []}] if post else None
