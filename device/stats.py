"""Small statistics the device reports (no SciPy on the Pi)."""

from __future__ import annotations

import math


def wilson_ci(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion; (nan, nan) when n == 0."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def count_decision(counted: int, blasts: int, target: int, threshold: float) -> dict:
    """Where a guided white-cell count stands: progress toward `target`, the blast fraction with its 95%
    Wilson CI, and the decision against `threshold` (a blast fraction such as 0.20).

    The decision is "above" or "below" only when the target is reached AND the CI lies wholly on one side
    of the threshold; otherwise "keep" (keep counting): below the target, or while the CI still contains it.
    """
    lo, hi = wilson_ci(blasts, counted)
    if counted < target:
        decision, text = "keep", f"keep counting: {counted} of {target} cells"
    elif lo > threshold:
        decision, text = "above", f"enough evidence: above {threshold:.0%} blasts"
    elif hi < threshold:
        decision, text = "below", f"enough evidence: below {threshold:.0%} blasts"
    else:
        decision, text = "keep", f"keep counting: the 95% CI still contains {threshold:.0%}"
    return {
        "counted": counted,
        "blasts": blasts,
        "target": target,
        "remaining": max(0, target - counted),
        "fraction": blasts / counted if counted else None,
        "ci95": None if counted == 0 else [lo, hi],
        "threshold": threshold,
        "decision": decision,
        "decision_text": text,
    }
