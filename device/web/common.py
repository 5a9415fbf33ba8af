"""Helpers the page and API blueprints share: the appliance, the reviewer's name, statistics, filters."""

from __future__ import annotations

import re
import statistics
from datetime import date

from flask import current_app, g, request

from device.errors import InputError

DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
PER_PAGE = 12


def appliance():
    return current_app.extensions["leukocam"]


def store():
    return appliance().store


def reviewer(given: str | None) -> str:
    """Who is reviewing: the logged-in user; without a login gate, the name given (or 'local')."""
    if g.get("user"):
        return g.user
    return (given or "").strip()[:64] or "local"


def gallery_filters(args) -> dict:
    """Parse and check the gallery filters. Raises InputError with a reason."""
    out = {
        "slide_id": args.get("slide") or None,
        "label": args.get("label") or None,
        "needs_review": None,
        "date_from": args.get("from") or None,
        "date_to": args.get("to") or None,
    }
    if out["label"] not in (None, "blast", "normal"):
        raise InputError("label: use blast or normal")
    review = args.get("review")
    if review:
        if review not in ("pending", "done"):
            raise InputError("review: use pending or done")
        out["needs_review"] = review == "pending"
    for key in ("date_from", "date_to"):
        if out[key]:
            try:
                date.fromisoformat(out[key])
            except ValueError:
                raise InputError(f"{key.replace('date_', '')}: use a date as YYYY-MM-DD") from None
            if not DAY.fullmatch(out[key]):
                raise InputError(f"{key.replace('date_', '')}: use a date as YYYY-MM-DD")
    return out


def latency_stats(limit: int = 200) -> dict:
    """Median and p95 (ms) of each stored stage timing over the newest captures."""
    per_stage: dict[str, list[float]] = {}
    for timings in store().recent_timings(limit):
        total = 0.0
        for stage, ms in timings.items():
            if isinstance(ms, int | float):
                per_stage.setdefault(stage, []).append(float(ms))
                total += ms
        if timings:
            per_stage.setdefault("total", []).append(total)
    return latency_summary(per_stage)


def latency_summary(samples: dict[str, list[float]]) -> dict:
    """Count, median and p95 (ms) of each non-empty list of latencies."""
    return {
        k: {"n": len(v), "median_ms": round(statistics.median(v), 1), "p95_ms": round(percentile(v, 95), 1)}
        for k, v in samples.items()
        if v
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100) of a non-empty list."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, -(-len(ordered) * q // 100) - 1))
    return ordered[int(k)]


def int_arg(name: str, default: int, low: int, high: int) -> int:
    """A whole-number query argument clamped to [low, high]; the default when absent or not a number."""
    value = request.args.get(name, default, type=int)
    return max(low, min(high, value if value is not None else default))


def enrich_capture(cap: dict) -> dict:
    """Add each cell's current verdict and the capture's review history."""
    current = store().current_reviews(cap["id"])
    for cell in cap["cells"]:
        review = current.get(cell["id"])
        cell["review"] = review
        cell["verdict"] = review["label"] if review else cell["label"]
    cap["reviews"] = store().review_history(capture_id=cap["id"])
    return cap


def model_card() -> dict:
    """What the status page and /api/model show about the loaded bundle."""
    app = appliance()
    info = app.bundle.info
    ver = info.verification or {}
    return {
        "name": info.name,
        "sha256": app.bundle.sha256,
        "synthetic": app.bundle.synthetic,
        "threshold": app.bundle.threshold,
        "review_band": list(app.bundle.review_band),
        "quantization": info.quantization.mode,
        "quantization_label": info.quantization.label,
        "speed": quantization_speed(info.quantization),
        "fallbacks": [{"mode": mode, "failures": why} for mode, why in info.quantization.fallbacks()],
        "created": info.created,
        "input_size": info.input_size,
        "runtime": app.classifier.runtime,
        "metrics": info.headline_metrics(),
        "verification": {
            k: ver.get(k)
            for k in (
                "n",
                "label_agreement",
                "mean_abs_dprob",
                "max_abs_dprob",
                "cam_correlation_mean",
                "delta_sensitivity",
            )
            if k in ver
        },
        "rolled_back": app.bundle_rolled_back,
        "note": app.bundle_note,
        "self_test": None
        if app.self_test is None
        else {"passed": app.self_test.passed, "message": app.self_test.message},
    }


def quantization_speed(q) -> dict | None:
    """The shipped mode's per-crop latency measured at conversion, and its cost against int8 in the same run
    (device.bundle_meta.QuantizationInfo.latency); None for bundles converted before convert timed the modes."""
    lat = q.latency or {}
    ms = lat.get("ms_per_crop")
    if not isinstance(ms, int | float):
        return None
    factor = q.speed_vs_int8
    int8_kernels = q.mode == "int8" and not q.float_layers  # also after quantization-aware fine-tuning
    if factor is None or int8_kernels:
        note = f"{q.label}: {_ms(ms)} ms per cell, measured at conversion"
    else:
        times = f"{factor:.0f}×" if factor >= 10 else f"{factor:.1f}×"
        cost = f"{times} slower per cell than int8" if factor >= 1 else f"{times} the int8 time per cell"
        note = (
            f"{q.label}: {cost}, measured at conversion ({_ms(ms)} ms against "
            f"{_ms(lat.get('int8_ms_per_crop') or 0)} ms per cell, {lat.get('threads')} threads)"
        )
    return {
        "ms_per_crop": ms,
        "int8_ms_per_crop": lat.get("int8_ms_per_crop"),
        "vs_int8": factor,
        "threads": lat.get("threads"),
        "cpu": lat.get("cpu"),
        "note": note,
        "int8_kernels": int8_kernels,
    }


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def slide_progress(slide_id: str) -> dict:
    """The guided count of one slide: cells counted once each (duplicates left out), blasts by the current
    verdict (the reviewer's, else the model's), progress toward [slides] target_cells, the decision against
    [slides] decision_threshold, and about how many more fields that takes at this slide's cells per field."""
    from device.stats import count_decision

    cfg = appliance().config.slides
    cells = [c for c in store().slide_cells(slide_id) if not c.get("duplicate_of")]
    out = count_decision(
        len(cells), sum(c["verdict"] == "blast" for c in cells), cfg.target_cells, cfg.decision_threshold
    )
    fields = len({c["capture_id"] for c in cells})
    per_field = len(cells) / fields if fields else None
    out["fields"] = fields
    out["fields_needed"] = -(-out["remaining"] // max(1, round(per_field))) if per_field else None
    out["slide_id"] = slide_id
    return out
