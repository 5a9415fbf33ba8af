"""Binary classification metrics with 95% confidence intervals."""

from __future__ import annotations

import numpy as np

from device.stats import wilson_ci


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula; None with one class only."""
    y = np.asarray(y_true).astype(int)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # Average ranks over ties.
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, sensitivity, specificity, PPV, NPV and F1, each with a Wilson 95% CI where it is a proportion."""
    y = np.asarray(y_true).astype(int)
    pred = (np.asarray(prob) >= threshold).astype(int)
    tp = int(np.sum((pred == 1) & (y == 1)))
    tn = int(np.sum((pred == 0) & (y == 0)))
    fp = int(np.sum((pred == 1) & (y == 0)))
    fn = int(np.sum((pred == 0) & (y == 1)))

    def prop(k: int, n: int) -> dict:
        # Undefined (no denominator) is None, not NaN, so metrics.json stays valid JSON.
        return {"value": k / n if n else None, "ci95": list(wilson_ci(k, n)) if n else None, "n": n}

    sens, ppv = prop(tp, tp + fn), prop(tp, tp + fp)
    f1 = (2 * sens["value"] * ppv["value"] / (sens["value"] + ppv["value"])
          if sens["value"] is not None and ppv["value"] is not None and (sens["value"] + ppv["value"]) > 0 else None)
    return {
        "threshold": threshold,
        "n": int(len(y)),
        "confusion": {"tp": tp, "tn": tn, "fp": fp, "fn": fn},
        "accuracy": prop(tp + tn, len(y)),
        "sensitivity": sens,
        "specificity": prop(tn, tn + fp),
        "ppv": ppv,
        "npv": prop(tn, tn + fn),
        "f1": f1,
        "auc": roc_auc(y, prob),
    }


def fmt(value: float | None, digits: int = 3) -> str:
    """A metric for people: fixed digits, or "n/a" when it is undefined."""
    return "n/a" if value is None else f"{value:.{digits}f}"
