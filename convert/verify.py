"""Verification of a converted model with the device's own classifier code.

Float (Keras) and converted (LiteRT, through `device.classifier.Classifier`)
outputs are compared on held-out crops: label agreement, probability
differences, metric differences and the correlation of the CAMs.
"""

from __future__ import annotations

import numpy as np

from device.bundle import load_bundle
from device.classifier import Classifier
from training.metrics import binary_metrics


def device_outputs(bundle_dir, crops: np.ndarray) -> dict[str, np.ndarray]:
    """Run crops through the device classifier of a bundle folder (no self-test)."""
    with Classifier(load_bundle(bundle_dir)) as clf:
        return clf.raw(crops)


def compare(float_out: dict, quant_out: dict, labels: np.ndarray | None, threshold: float) -> dict:
    """Agreement and differences between float and converted outputs."""
    pf, pq = float_out["probability"], quant_out["probability"]
    dp = np.abs(pf - pq)
    corr = [_pearson(a.ravel(), b.ravel()) for a, b in zip(float_out["cam"], quant_out["cam"], strict=True)]
    corr = [c for c in corr if np.isfinite(c)]
    result = {
        "n": int(len(pf)),
        "label_agreement": float(np.mean((pf >= threshold) == (pq >= threshold))),
        "mean_abs_dprob": float(dp.mean()),
        "max_abs_dprob": float(dp.max()),
        "cam_correlation_mean": float(np.mean(corr)) if corr else None,
        "cam_correlation_min": float(np.min(corr)) if corr else None,
    }
    if labels is not None:
        mf, mq = binary_metrics(labels, pf, threshold), binary_metrics(labels, pq, threshold)
        result["float_metrics"], result["quantized_metrics"] = mf, mq
        for key in ("accuracy", "sensitivity", "specificity"):
            a, b = mq[key]["value"], mf[key]["value"]
            result[f"delta_{key}"] = None if a is None or b is None else float(a - b)
    return result


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
