"""The guided count: a slide's target, the blast fraction's 95% CI and the decision against a threshold."""

from __future__ import annotations

import dataclasses

import pytest

from device.config import SlidesConfig
from device.service import Appliance
from device.stats import count_decision


@pytest.mark.parametrize(
    ("counted", "blasts", "decision"),
    [
        (0, 0, "keep"),  # nothing counted
        (150, 140, "keep"),  # far above 20%, but below the target of 200
        (200, 120, "above"),  # 60%: CI 53-67% lies above 20%
        (200, 10, "below"),  # 5%: CI 3-9% lies below 20%
        (200, 40, "keep"),  # 20%: the CI contains the threshold
        (400, 120, "above"),  # 30%: CI 25.7-34.7% lies above 20%
    ],
)
def test_the_decision_needs_the_target_and_a_ci_on_one_side(counted, blasts, decision):
    out = count_decision(counted, blasts, target=200, threshold=0.20)
    lo, hi = out["ci95"] or (None, None)
    if counted >= 200 and lo is not None and (lo > 0.2 or hi < 0.2):
        expected = "above" if lo > 0.2 else "below"
    else:
        expected = "keep"
    assert out["decision"] == expected
    assert out["decision"] == decision
    assert out["remaining"] == max(0, 200 - counted)
    text = out["decision_text"]
    assert text.startswith("enough evidence") if expected != "keep" else text.startswith("keep counting")


def test_the_appliance_reports_a_complete_count(config):
    cfg = dataclasses.replace(config, slides=SlidesConfig(target_cells=10, decision_threshold=0.5))
    with Appliance(cfg) as app:
        for _ in range(12):  # the replay camera cycles through the sample fields; repeats are counted once
            if len(app.store.slide_cells(app.slide_id)) >= 10:
                break
            assert app.capture_now("test").status in ("ok", "retake")
        cells = app.store.slide_cells(app.slide_id)
        out = count_decision(len(cells), sum(c["verdict"] == "blast" for c in cells), 10, 0.5)
        assert app.count_decided() is (out["decision"] != "keep")
        # reviewing every cell as normal makes the count decide "below" whatever the model said
        for c in cells:
            app.store.add_review(c["cell_id"], "normal", "tech")
        assert app.count_decided() is True
        assert count_decision(len(cells), 0, 10, 0.5)["decision"] == "below"
