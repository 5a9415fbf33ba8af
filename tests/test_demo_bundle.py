"""The shipped SYNTHETIC demo bundle: what model.json claims, and what the README says it does on real cells.

No TensorFlow: the bundle runs on the device runtime, as `make run` uses it.
"""

from __future__ import annotations

import json

import pytest

from convert.demo import REAL_CELLS_BEGIN, REAL_CELLS_END, real_cell_predictions, real_cells_markdown
from tests.conftest import REPO

DOCS = REPO / "docs" / "demo.md"


@pytest.fixture(scope="module")
def meta(demo_bundle_dir):
    return json.loads((demo_bundle_dir / "model.json").read_text())


def test_the_demo_bundle_says_it_is_synthetic_and_carries_metrics_with_intervals(meta):
    assert meta["synthetic"] is True and "synthetic" in meta["name"]
    test = meta["training"]["test_metrics"]
    for key in ("accuracy", "sensitivity", "specificity"):
        low, high = test[key]["ci95"]
        assert low <= test[key]["value"] <= high
    assert 0.5 < test["auc"] <= 1.0


def test_the_gate_says_how_many_crops_it_measured_and_every_rung_was_timed(meta, demo_bundle_dir):
    gate, verification, quant = meta["gate"], meta["verification"], meta["quantization"]
    assert gate["passed"] and not gate["forced"]
    assert gate["min_agreement"] >= 0.99 and gate["max_delta_sensitivity"] <= 0.01
    # Fewer held-out crops than the gate's minimum is said, not hidden (a bundle converted on fewer than 1,000).
    enough = verification["gate_crops"] >= gate["min_crops"]
    assert verification["gate_crops_enough"] == enough
    assert enough or any("held-out crops" in w for w in gate["warnings"])
    tried = [a for a in quant["attempts"] if not a.get("skipped")]
    assert tried and all(a["latency_ms"] > 0 for a in tried)
    assert [a["mode"] for a in quant["attempts"] if a.get("chosen")] == [quant["attempts"][-1]["mode"]]
    # Full int8 ships (issue 11): the chosen rung runs int8 kernels throughout, no layer left in float, and it
    # passed the gate on at least 1,000 held-out crops.
    chosen = quant["attempts"][-1]
    assert quant["mode"] == "int8" and not quant.get("float_layers") and not chosen.get("float_layers")
    assert chosen["passed"] and chosen["n"] >= gate["min_crops"] >= 1000 and chosen["label_agreement"] >= 0.99
    assert abs(chosen["delta_sensitivity"]) <= 0.01 and chosen["cam_correlation_mean"] >= 0.9
    # The ladder's second rung, int8 after quantization-aware fine-tuning, was tried on the train split's crops
    # and its gate figures are kept beside the others (docs/demo.md and docs/convert.md give them).
    tuned = [a for a in quant["attempts"] if a["mode"] == "int8 quantization-aware"]
    assert len(tuned) == 1 and tuned[0]["quant"] == "int8" and tuned[0]["n"] == verification["gate_crops"]
    assert tuned[0]["fine_tuning"]["crops"] == 1620 and tuned[0]["fine_tuning"]["epochs"] == 6
    assert tuned[0]["flips"] < quant["attempts"][0]["flips"], "fine-tuning flips fewer crops than plain int8"
    # Every batch norm was clipped at its 0.9999 quantile first, and the convert report says so.
    assert tuned[0]["fine_tuning"]["clipped_tensors"] == 78 and tuned[0]["fine_tuning"]["clip_quantile"] == 0.9999
    report = (demo_bundle_dir / "convert_report.md").read_text()
    assert "78 batch-norm outputs clipped at their 0.9999 quantile" in report


def test_the_docs_show_what_the_bundle_does_on_the_nine_real_cells(demo_bundle_dir):
    """The tables in docs/demo.md and the README are the bundle's own output on tests/data/cnmc-sample (regenerate it with
    `python -c "from convert.demo import *; print(real_cells_markdown(real_cell_predictions(...)))"`)."""
    rows = real_cell_predictions(demo_bundle_dir, REPO / "tests" / "data" / "cnmc-sample")
    assert len(rows) == 9 and {r["truth"] for r in rows} == {"blast", "normal"}
    for doc in (DOCS, REPO / "README.md"):
        text = doc.read_text()
        assert REAL_CELLS_BEGIN in text and REAL_CELLS_END in text, doc
        shown = text[text.index(REAL_CELLS_BEGIN) : text.index(REAL_CELLS_END) + len(REAL_CELLS_END)]
        assert shown == real_cells_markdown(rows), f"{doc.name}: regenerate the table from the bundle"
