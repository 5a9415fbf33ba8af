"""JSON Schemas of what the API returns (OpenAPI 3.1 / JSON Schema 2020-12).

They list what every response has (`required`) and the type of each member; objects may
carry more members than listed (they grow; clients ignore what they do not know).
Schemathesis checks every response of the live server against them (tests/test_openapi.py).
"""

from __future__ import annotations


def obj(required: dict, optional: dict | None = None) -> dict:
    """An object whose `required` members are always there."""
    return {"type": "object", "required": sorted(required), "properties": {**required, **(optional or {})}}


def maybe(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


STR = {"type": "string"}
INT = {"type": "integer"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}
LABEL = {"type": "string", "enum": ["blast", "normal"]}
ANY_OBJ = {"type": "object"}

OUTCOME = obj(
    {"capture_id": maybe(INT), "status": {"type": "string", "enum": ["ok", "retake", "error"]}, "message": STR}
)

SLIDE = obj(
    {
        "id": STR,
        "created_at": STR,
        "reviewed_at": maybe(STR),
        "reviewed_by": maybe(STR),
        "captures": INT,
        "ok_captures": INT,
        "cells": INT,
        "positive": INT,
        "needs_review": INT,
        "flagged": INT,
        "unreviewed": INT,
        "duplicates": INT,
        "blast_fraction": maybe(NUM),
        "blast_fraction_ci95": maybe({"type": "array", "items": NUM, "minItems": 2, "maxItems": 2}),
    }
)
SLIDE_DETAIL = {
    "allOf": [SLIDE, obj({"reviewed_cells": INT, "provenance": ANY_OBJ})],
}
REVIEW = obj(
    {
        "id": INT,
        "cell_id": INT,
        "capture_id": INT,
        "slide_id": STR,
        "created_at": STR,
        "reviewer": STR,
        "label": LABEL,
        "model_label": LABEL,
        "action": STR,
        "note": STR,
    }
)
CAPTURE_ROW = obj(
    {
        "id": INT,
        "uid": STR,
        "slide_id": STR,
        "created_at": STR,
        "source": STR,
        "trigger": STR,
        "status": {"type": "string", "enum": ["ok", "retake", "error"]},
        "message": STR,
        "width": INT,
        "height": INT,
        "um_per_px": maybe(NUM),
        "model_sha256": STR,
        "model_synthetic": BOOL,
        "qc": ANY_OBJ,
        "timings": ANY_OBJ,
        "camera": ANY_OBJ,
        "n_cells": INT,
    },
    {
        "n_positive": INT,
        "n_review": INT,
        "n_flagged": INT,
        "n_reviewed": INT,
        "n_duplicates": INT,
        "cam_scale": maybe(NUM),
    },
)
CELL = obj(
    {
        "id": INT,
        "capture_id": INT,
        "idx": INT,
        "box": {"type": "array", "items": INT, "minItems": 4, "maxItems": 4},
        "probability": NUM,
        "logit": NUM,
        "label": LABEL,
        "positive": BOOL,
        "needs_review": BOOL,
        "verdict": LABEL,
        "review": maybe(REVIEW),
        "crop_url": STR,
        "heatmap_url": STR,
    },
    {"duplicate_of": maybe(INT)},
)
CAPTURE = {
    "allOf": [
        CAPTURE_ROW,
        obj(
            {"cells": {"type": "array", "items": CELL}, "reviews": {"type": "array", "items": REVIEW}, "field_url": STR}
        ),
    ]
}
CELL_DETAIL = obj(
    {
        "id": INT,
        "capture_id": INT,
        "slide_id": STR,
        "idx": INT,
        "x0": INT,
        "y0": INT,
        "x1": INT,
        "y1": INT,
        "probability": NUM,
        "logit": NUM,
        "label": LABEL,
        "positive": BOOL,
        "needs_review": BOOL,
        "verdict": LABEL,
        "reviews": {"type": "array", "items": REVIEW},
    }
)
HEALTH_PUBLIC = {
    "type": "object",
    "required": ["ok"],
    "properties": {"ok": BOOL},
    "additionalProperties": False,
}
HEALTH = obj(
    {
        "ok": BOOL,
        "worker_alive": BOOL,
        "busy": BOOL,
        "uptime_s": NUM,
        "captures_done": INT,
        "last_error": maybe(STR),
        "scale_warning": maybe(STR),
        "last_outcome": maybe(OUTCOME),
        "camera": STR,
        "slide_id": STR,
        "slide": maybe(SLIDE),
        "runtime": STR,
        "model": obj({"path": STR, "sha256": STR, "name": STR, "synthetic": BOOL, "threshold": NUM}),
        "self_test": maybe(STR),
        "store": obj({"captures": INT, "free_mb": INT, "reconcile": STR}),
    }
)
STATUS = obj({"health": HEALTH, "model": ANY_OBJ, "latency_ms": ANY_OBJ, "disk": ANY_OBJ})
LATEST = obj(
    {
        "latest_id": maybe(INT),
        "captures": INT,
        "busy": BOOL,
        "last_outcome": maybe(OUTCOME),
        "last_error": maybe(STR),
        "slide_id": STR,
    }
)
CAPTURE_PAGE = obj({"total": INT, "limit": INT, "offset": INT, "captures": {"type": "array", "items": CAPTURE_ROW}})
SLIDES = obj({"current": STR, "slides": {"type": "array", "items": SLIDE}})
REVIEWS = obj({"reviews": {"type": "array", "items": REVIEW}})
CSRF = obj({"csrf_token": STR, "header": {"const": "X-CSRFToken"}})
QUEUED = obj({"queued": {"const": True}})
CURRENT = obj({"current": STR})
LOGGED_IN = obj({"user": STR, "csrf_token": STR})
RESULTS_JSON = obj(
    {
        "slide": SLIDE,
        "provenance": ANY_OBJ,
        "cells": {"type": "array", "items": ANY_OBJ},
        "reviews": {"type": "array", "items": REVIEW},
    }
)
