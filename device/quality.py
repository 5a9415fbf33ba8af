"""Quality checks on a field before classification: focus and exposure.

The empty-field check ("no white cells") lives in the pipeline, since it needs
the cell finder. Thresholds come from [quality] in the config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from device.imaging import check_rgb

WORK_SIDE = 1024
"""Focus is measured at a fixed working size so that thresholds do not depend on the sensor."""


@dataclass(frozen=True)
class QualityReport:
    focus: float
    """Variance of the Laplacian of the grey field at working size; low = blurred."""
    clipped_fraction: float
    """Largest fraction of pixels at 0 or 255 over the three channels."""
    mean_brightness: float
    """Mean grey level 0-255."""
    problems: tuple[str, ...]
    """Human-readable reasons to retake; empty when the field is usable."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        d = asdict(self)
        d["problems"] = list(self.problems)
        d["ok"] = self.ok
        return d


def assess(rgb: np.ndarray, min_focus: float, max_clipped_fraction: float) -> QualityReport:
    """Measure focus and exposure of a uint8 RGB field."""
    check_rgb(rgb, "field")
    h, w = rgb.shape[:2]
    scale = min(1.0, WORK_SIDE / max(h, w))
    small = (
        cv2.resize(rgb, (max(1, int(w * scale)), max(1, int(h * scale))), interpolation=cv2.INTER_AREA)
        if scale < 1
        else rgb
    )
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    # Variance of the Laplacian (OpenCV's mean and standard deviation, accumulated in double precision).
    _, sd = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))
    focus = float(sd[0, 0]) ** 2
    # The share of pixels at 0 or 255, in the worst channel (counted by OpenCV: a tenth of NumPy's time on
    # a channel of an interleaved image).
    clipped = max((ch.size - cv2.countNonZero(cv2.inRange(ch, 1, 254))) / ch.size for ch in cv2.split(small))
    problems = []
    if focus < min_focus:
        problems.append(f"out of focus (sharpness {focus:.0f} < {min_focus:.0f}): turn the fine focus and retake")
    if clipped > max_clipped_fraction:
        problems.append(
            f"badly exposed ({clipped:.1%} of pixels clipped > {max_clipped_fraction:.0%}): adjust the lamp or exposure and retake"
        )
    return QualityReport(focus, clipped, float(grey.mean()), tuple(problems))


def suggest_thresholds(good: list[QualityReport]) -> dict:
    """Thresholds from a few fields the operator judged good (in focus, well exposed).

    min_focus is half the sharpness of the least sharp good field: blur of one
    or two pixels drops the variance of the Laplacian three- to fourfold, so half
    keeps every good field and still rejects a visibly soft one. The clipping
    limit leaves twice the worst good field's clipping, at least 1 %.
    """
    if not good:
        raise ValueError("calibration needs at least one good field")
    return {
        "min_focus": round(0.5 * min(r.focus for r in good), 2),
        "max_clipped_fraction": round(max(0.01, 2 * max(r.clipped_fraction for r in good)), 4),
    }
