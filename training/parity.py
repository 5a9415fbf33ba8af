"""Field-path parity: does the device's path (finder -> crop -> classifier) see cells as training did?

This module owns the end-to-end check that the fidelity gate alone cannot do.
The gate compares the float and the quantized model on training-path images;
here the same cells reach the bundle two ways:

- training path: the cell cut out by its true outline (the ideal segmentation,
  as C-NMC's organisers cut theirs), on black, through `prepare_cell` at the
  training scale;
- field path: the whole SYNTHETIC field through the device's finder and
  `crop_cell`, exactly as on the rig with a calibrated pixel size.

Both go through the device's own `Classifier`. The report gives each path's
sensitivity and specificity with Wilson CIs, the per-cell probability
difference, and a paired test of the sensitivity loss: among the blasts, how
many the training path calls and the field path misses (b) against the other
way round (c); an exact binomial test on b vs c says whether a loss is more
than chance. A blast the finder misses counts as missed by the field path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from device.cells import FinderParams, find_white_cells
from device.classifier import Classifier
from device.preprocess import crop_cell, prepare_cell
from training.metrics import binary_metrics

LABEL_VALUE = {"all": 1, "hem": 0}


@dataclass(frozen=True)
class ParityGate:
    """When the field path fails the gate."""

    max_sensitivity_loss: float = 0.01
    """Largest accepted drop of sensitivity from the training path to the field path (the int8 gate's 1 point) ..."""
    alpha: float = 0.05
    """... unless the paired test cannot tell the drop from chance at this level (small samples)."""

    def passes(self, sensitivity_loss: float, p_value: float) -> bool:
        """Fail only a loss that is both larger than allowed and more than chance."""
        return not (sensitivity_loss > self.max_sensitivity_loss and p_value < self.alpha)


def _binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2): one-sided exact test that b > c among n = b + c discordant pairs."""
    if n == 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n


def field_parity(
    classifier: Classifier,
    n_fields: int = 30,
    um_per_px: float = 0.1,
    cells_per_field: int = 4,
    width: int = 960,
    height: int = 720,
    seed: int = 0,
    gate: ParityGate = ParityGate(),
) -> dict:
    """Run SYNTHETIC fields with known cells through both paths and compare.

    Returns:
        dict with training_path and field_path metrics (binary_metrics), cells, found, missed, extra,
        mean_abs_dprob and max_abs_dprob over found cells, the paired counts b and c, p_value,
        sensitivity_loss, passed and a one-line reason.
    """
    from training import synth

    contract = classifier.bundle.contract
    threshold = classifier.bundle.threshold
    rng = np.random.default_rng(seed)
    y, p_train, p_field = [], [], []
    found_n = missed = extra = 0
    dprob = []
    for _ in range(n_fields):
        masks: list[np.ndarray] = []
        field, cells = synth.render_field(
            rng,
            width,
            height,
            cells_per_field,
            um_per_px=um_per_px,
            stain=synth.random_stain(rng),
            masks=masks,
            cell_style="cnmc",  # the single cells a model learns (render_cell, like C-NMC's), not the smear look
        )
        train_crops = []
        for c, m in zip(cells, masks, strict=True):
            x0, y0, x1, y1 = c["box"]
            x0, y0 = max(0, x0), max(0, y0)
            cell = field[y0:y1, x0:x1].copy()
            cell[~m[y0:y1, x0:x1]] = 0
            train_crops.append(prepare_cell(cell, contract, um_per_px))
        found = find_white_cells(field, FinderParams(um_per_px=um_per_px))
        pairs = _pair(found, cells)
        extra += len(found) - len(pairs)
        field_crops = {
            j: crop_cell(field, found[i].box, found[i].mask, contract, um_per_px=um_per_px) for i, j in pairs.items()
        }
        probs_train = [p.probability for p in classifier.classify(np.stack(train_crops))]
        probs_field = {}
        if field_crops:
            keys = sorted(field_crops)
            for j, p in zip(keys, classifier.classify(np.stack([field_crops[k] for k in keys])), strict=True):
                probs_field[j] = p.probability
        for j, c in enumerate(cells):
            y.append(LABEL_VALUE[c["label"]])
            p_train.append(probs_train[j])
            if j in probs_field:
                found_n += 1
                p_field.append(probs_field[j])
                dprob.append(abs(probs_field[j] - probs_train[j]))
            else:
                missed += 1
                p_field.append(0.0)  # not found: never called a blast
    y_arr, pt, pf = np.array(y), np.array(p_train), np.array(p_field)
    pos = y_arr == 1
    call_t, call_f = pt >= threshold, pf >= threshold
    b = int(np.sum(pos & call_t & ~call_f))  # blasts the training path calls and the field path misses
    c = int(np.sum(pos & ~call_t & call_f))
    p_value = _binomial_tail(b, b + c)
    train_m, field_m = binary_metrics(y_arr, pt, threshold), binary_metrics(y_arr, pf, threshold)
    loss = (train_m["sensitivity"]["value"] or 0.0) - (field_m["sensitivity"]["value"] or 0.0)
    passed = gate.passes(loss, p_value)
    reason = (
        f"field path sensitivity {field_m['sensitivity']['value']:.3f} vs training path "
        f"{train_m['sensitivity']['value']:.3f} (loss {loss:+.3f}; paired b={b}, c={c}, p={p_value:.3g})"
    )
    return {
        "synthetic": True,
        "fields": n_fields,
        "um_per_px": um_per_px,
        "cells": len(y),
        "found": found_n,
        "missed": missed,
        "extra": extra,
        "training_path": train_m,
        "field_path": field_m,
        "mean_abs_dprob": float(np.mean(dprob)) if dprob else None,
        "max_abs_dprob": float(np.max(dprob)) if dprob else None,
        "b": b,
        "c": c,
        "p_value": p_value,
        "sensitivity_loss": loss,
        "passed": passed,
        "reason": reason,
    }


def _pair(found, cells) -> dict[int, int]:
    """found index -> true cell index, one to one, a found box's centre inside the true box (nearest first)."""
    candidates = []
    for i, f in enumerate(found):
        cx, cy = (f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2
        for j, c in enumerate(cells):
            x0, y0, x1, y1 = c["box"]
            if x0 <= cx <= x1 and y0 <= cy <= y1:
                candidates.append((math.hypot(cx - (x0 + x1) / 2, cy - (y0 + y1) / 2), i, j))
    pairs: dict[int, int] = {}
    used = set()
    for _, i, j in sorted(candidates):
        if i not in pairs and j not in used:
            pairs[i] = j
            used.add(j)
    return pairs


def parity_markdown(r: dict) -> str:
    """The parity table: both paths side by side."""

    def cell(m: dict, key: str) -> str:
        v = m[key]
        if v["value"] is None:
            return "–"
        return f"{v['value']:.3f} ({v['ci95'][0]:.3f}–{v['ci95'][1]:.3f})"

    lines = [
        f"Field-path parity on {r['fields']} SYNTHETIC fields at {r['um_per_px']} µm/px: {r['cells']} cells, "
        f"{r['found']} found by the finder ({r['missed']} missed, {r['extra']} extra).",
        "",
        "| path | sensitivity (95% CI) | specificity (95% CI) | accuracy (95% CI) |",
        "| --- | --- | --- | --- |",
        f"| training path (true outline on black, `prepare_cell`) | {cell(r['training_path'], 'sensitivity')} | "
        f"{cell(r['training_path'], 'specificity')} | {cell(r['training_path'], 'accuracy')} |",
        f"| field path (finder → `crop_cell`) | {cell(r['field_path'], 'sensitivity')} | "
        f"{cell(r['field_path'], 'specificity')} | {cell(r['field_path'], 'accuracy')} |",
        "",
    ]
    if r["mean_abs_dprob"] is not None:
        lines.append(
            f"Per found cell, |p(field) − p(training)|: mean {r['mean_abs_dprob']:.3f}, "
            f"max {r['max_abs_dprob']:.3f}. {r['reason']}: {'passed' if r['passed'] else 'FAILED'}."
        )
    return "\n".join(lines) + "\n"
