"""The quality gate and its calibration from good fields."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from click.testing import CliRunner

from device.cli import cli
from device.imaging import decode_image
from device.quality import assess, suggest_thresholds

BCCD = Path(__file__).parent / "data" / "bccd" / "JPEGImages"


def test_calibrated_thresholds_accept_good_fields_and_reject_blurred_ones(demo_fields_dir):
    good = [decode_image(p) for p in sorted(BCCD.glob("*.jpg"))[:5]]
    t = suggest_thresholds([assess(f, 0, 1) for f in good])
    for f in good:
        assert assess(f, **t).ok
        blurred = cv2.GaussianBlur(f, (0, 0), 2.0)
        report = assess(blurred, **t)
        assert not report.ok and "focus" in report.problems[0]


def test_overexposed_field_is_flagged():
    field = decode_image(sorted(BCCD.glob("*.jpg"))[0])
    bright = np.clip(field.astype(np.int16) + 120, 0, 255).astype(np.uint8)
    report = assess(bright, min_focus=0.0, max_clipped_fraction=0.05)
    assert not report.ok and "exposed" in report.problems[0]


def test_calibrate_qc_command_prints_a_toml_section(demo_fields_dir):
    paths = [str(p) for p in sorted(demo_fields_dir.glob("*.jpg"))]
    result = CliRunner().invoke(cli, ["calibrate-qc", *paths])
    assert result.exit_code == 0, result.output
    assert "[quality]" in result.output and "min_focus = " in result.output
