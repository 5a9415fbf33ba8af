"""Field-path parity (training/parity.py): the device's whole path against the training path on the same cells."""

from __future__ import annotations

import numpy as np
import pytest

from training.parity import ParityGate, _binomial_tail, field_parity, parity_markdown


def test_both_paths_see_the_same_cells(physical_classifier):
    r = field_parity(physical_classifier, n_fields=4, cells_per_field=3, width=640, height=480, seed=1)
    assert r["synthetic"] is True and r["cells"] == 12
    assert r["found"] + r["missed"] == r["cells"] and r["found"] >= 11
    for path in ("training_path", "field_path"):
        assert r[path]["n"] == 12
        assert r[path]["sensitivity"]["n"] + r[path]["specificity"]["n"] == 12
    assert 0 <= r["mean_abs_dprob"] <= r["max_abs_dprob"] <= 1
    positives = r["training_path"]["sensitivity"]["n"]
    assert r["b"] + r["c"] <= positives
    md = parity_markdown(r)
    assert "training path" in md and "field path" in md and "SYNTHETIC" in md


def test_the_gate_fails_only_a_real_loss():
    gate = ParityGate(max_sensitivity_loss=0.01)
    assert gate.passes(0.20, 0.5)  # large but not more than chance (tiny sample)
    assert gate.passes(0.005, 0.001)  # significant but within what the int8 gate allows
    assert not gate.passes(0.20, 0.001)
    # Exact one-sided binomial: 8 of 8 discordant pairs one way is p = 1/256.
    assert _binomial_tail(8, 8) == pytest.approx(1 / 256)
    assert _binomial_tail(0, 5) == 1.0 and _binomial_tail(0, 0) == 1.0
    assert np.isclose(_binomial_tail(5, 10), 0.623046875)
