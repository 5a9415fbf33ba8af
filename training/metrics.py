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


def binary_metrics(
    y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5, groups=None, n_boot: int = 1000, seed: int = 0
) -> dict:
    """Accuracy, sensitivity, specificity, PPV, NPV, F1 and AUC, each with a 95% CI.

    Args:
        groups: the subject of each image. With two or more subjects the CIs come from a percentile
            bootstrap over subjects (cells of one patient are correlated, so cell-level intervals are too
            narrow); without, proportions get Wilson intervals and the AUC a bootstrap over images.
            `ci_method` says which.
    """
    y = np.asarray(y_true).astype(int)
    prob = np.asarray(prob, dtype=np.float64)
    pred = (prob >= threshold).astype(int)
    tp = int(np.sum((pred == 1) & (y == 1)))
    tn = int(np.sum((pred == 0) & (y == 0)))
    fp = int(np.sum((pred == 1) & (y == 0)))
    fn = int(np.sum((pred == 0) & (y == 1)))
    by_subject = groups is not None and len(set(groups)) >= 2
    boot = _subject_bootstrap(y, prob, pred, groups, n_boot, seed) if by_subject else None

    def prop(name: str, k: int, n: int) -> dict:
        # Undefined (no denominator) is None, not NaN, so metrics.json stays valid JSON.
        if not n:
            return {"value": None, "ci95": None, "n": n}
        ci = boot[name] if boot is not None else list(wilson_ci(k, n))
        return {"value": k / n, "ci95": ci, "n": n}

    sens, ppv = prop("sensitivity", tp, tp + fn), prop("ppv", tp, tp + fp)
    f1 = (
        2 * sens["value"] * ppv["value"] / (sens["value"] + ppv["value"])
        if sens["value"] is not None and ppv["value"] is not None and (sens["value"] + ppv["value"]) > 0
        else None
    )
    n_subjects = len(set(groups)) if groups is not None else None
    return {
        "threshold": threshold,
        "n": int(len(y)),
        "subjects": n_subjects,
        "ci_method": (
            f"percentile bootstrap over {n_subjects} subjects ({n_boot} resamples)"
            if by_subject
            else "Wilson score (cells treated as independent); AUC: bootstrap over cells"
        ),
        "confusion": {"tp": tp, "tn": tn, "fp": fp, "fn": fn},
        "accuracy": prop("accuracy", tp + tn, len(y)),
        "sensitivity": sens,
        "specificity": prop("specificity", tn, tn + fp),
        "ppv": ppv,
        "npv": prop("npv", tn, tn + fn),
        "f1": f1,
        "auc": roc_auc(y, prob),
        "auc_ci95": boot["auc"] if boot is not None else auc_ci(y, prob),
        "f1_weighted": weighted_f1(y, prob, threshold),
    }


def _subject_bootstrap(y, prob, pred, groups, n_boot: int, seed: int) -> dict:
    """95% percentile intervals of the proportions and the AUC, resampling whole subjects with replacement."""
    keys = np.asarray([str(g) for g in groups])
    subjects, inverse = np.unique(keys, return_inverse=True)
    n_sub = len(subjects)
    # Per-subject counts, so each resample is a sum over drawn subjects.
    counts = np.zeros((n_sub, 4))
    for j, (cond) in enumerate(
        ((pred == 1) & (y == 1), (pred == 0) & (y == 0), (pred == 1) & (y == 0), (pred == 0) & (y == 1))
    ):
        counts[:, j] = np.bincount(inverse, weights=cond.astype(float), minlength=n_sub)
    members = [np.flatnonzero(inverse == s) for s in range(n_sub)]
    rng = np.random.default_rng(seed)
    stats: dict[str, list[float]] = {k: [] for k in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "auc")}
    for _ in range(n_boot):
        draw = rng.integers(0, n_sub, n_sub)
        tp, tn, fp, fn = counts[draw].sum(axis=0)
        for name, k, n in (
            ("accuracy", tp + tn, tp + tn + fp + fn),
            ("sensitivity", tp, tp + fn),
            ("specificity", tn, tn + fp),
            ("ppv", tp, tp + fp),
            ("npv", tn, tn + fn),
        ):
            if n:
                stats[name].append(k / n)
        idx = np.concatenate([members[s] for s in draw])
        if 0 < y[idx].sum() < len(idx):
            stats["auc"].append(_fast_auc(y[idx], prob[idx]))
    return {k: ([float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None) for k, v in stats.items()}


def fmt(value: float | None, digits: int = 3) -> str:
    """A metric for people: fixed digits, or "n/a" when it is undefined."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def weighted_f1(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> float | None:
    """F1 of each class weighted by its support (the C-NMC 2019 challenge's metric)."""
    y = np.asarray(y_true).astype(int)
    pred = (np.asarray(prob) >= threshold).astype(int)
    if len(y) == 0:
        return None
    total = 0.0
    for c in (0, 1):
        tp = np.sum((pred == c) & (y == c))
        denom = np.sum(pred == c) + np.sum(y == c)
        total += (2 * tp / denom if denom else 0.0) * np.sum(y == c)
    return float(total / len(y))


def _fast_auc(y: np.ndarray, s: np.ndarray) -> float:
    from scipy.stats import rankdata

    n_pos = y.sum()
    n_neg = len(y) - n_pos
    return float((rankdata(s)[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_ci(y_true: np.ndarray, score: np.ndarray, n_boot: int = 500, seed: int = 0) -> list[float] | None:
    """Percentile bootstrap 95% CI of the ROC AUC (seeded); resamples with one class only are skipped."""
    y = np.asarray(y_true).astype(int)
    s = np.asarray(score, dtype=np.float64)
    if y.sum() == 0 or y.sum() == len(y):
        return None
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        yb = y[idx]
        if 0 < yb.sum() < len(yb):
            aucs.append(_fast_auc(yb, s[idx]))
    if not aucs:
        return None
    return [float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5))]


def ece(y_true: np.ndarray, prob: np.ndarray, bins: int = 10) -> float | None:
    """Expected calibration error of the positive-class probability, equal-width bins on [0, 1].

    Sum over bins of (bin size / N) * |mean label - mean probability|; a probability of exactly 1 goes in the last bin.
    """
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(prob, dtype=np.float64)
    if len(y) == 0:
        return None
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() / len(y) * abs(y[m].mean() - p[m].mean())
    return float(total)


def reliability(y_true: np.ndarray, prob: np.ndarray, bins: int = 10) -> list[dict]:
    """Per-bin (lower edge, count, mean probability, fraction positive) for a reliability diagram."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(prob, dtype=np.float64)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    return [
        {
            "lo": b / bins,
            "n": int((idx == b).sum()),
            "mean_prob": float(p[idx == b].mean()) if (idx == b).any() else None,
            "frac_pos": float(y[idx == b].mean()) if (idx == b).any() else None,
        }
        for b in range(bins)
    ]


def nll(y_true: np.ndarray, logits: np.ndarray, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy of sigmoid(logit / T)."""
    y = np.asarray(y_true, dtype=np.float64)
    z = np.asarray(logits, dtype=np.float64) / temperature
    # log(1 + exp(-|z|)) form: stable for large logits.
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def fit_temperature(y_true: np.ndarray, logits: np.ndarray) -> float:
    """Temperature T > 0 minimising validation NLL of sigmoid(logit / T): a log-spaced grid, then a golden-section refine.

    T = 1 is on the grid, so the result never has a higher NLL than the uncalibrated model.
    """
    grid = np.concatenate([np.logspace(-2, 2, 81), [1.0]])
    losses = [nll(y_true, logits, t) for t in grid]
    best = float(grid[int(np.argmin(losses))])
    lo, hi = np.log(best) - 0.06, np.log(best) + 0.06
    g = (np.sqrt(5) - 1) / 2
    for _ in range(30):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if nll(y_true, logits, np.exp(a)) < nll(y_true, logits, np.exp(b)):
            hi = b
        else:
            lo = a
    refined = float(np.exp((lo + hi) / 2))
    return refined if nll(y_true, logits, refined) <= nll(y_true, logits, best) else best


def threshold_for_sensitivity(y_true: np.ndarray, prob: np.ndarray, target: float = 0.95) -> float:
    """The largest threshold t whose sensitivity (share of positives with prob >= t) is at least target."""
    y = np.asarray(y_true).astype(int)
    pos = np.sort(np.asarray(prob, dtype=np.float64)[y == 1])[::-1]
    if len(pos) == 0:
        raise ValueError("no positive examples: cannot choose a threshold for a sensitivity")
    k = max(1, int(np.ceil(target * len(pos) - 1e-9)))
    return float(pos[k - 1])


def threshold_for_specificity(y_true: np.ndarray, prob: np.ndarray, target: float = 0.99) -> float:
    """The smallest threshold t whose specificity (share of negatives with prob < t) is at least target."""
    y = np.asarray(y_true).astype(int)
    neg = np.sort(np.asarray(prob, dtype=np.float64)[y == 0])
    if len(neg) == 0:
        raise ValueError("no negative examples: cannot choose a threshold for a specificity")
    m = max(1, int(np.ceil(target * len(neg) - 1e-9)))
    return float(min(1.0, np.nextafter(neg[m - 1], np.inf)))


def operating_point(
    y_true: np.ndarray, prob: np.ndarray, target_sensitivity: float = 0.95, band_level: float = 0.99
) -> tuple[float, list[float]]:
    """(threshold, review band) chosen on validation.

    Threshold: the largest with sensitivity >= target_sensitivity. Review band:
    [threshold at sensitivity band_level, threshold at specificity band_level],
    widened to contain the threshold. Below the band almost no blast is missed
    and above it almost no normal cell is called a blast (on validation); in
    between the model is least reliable, so those cells go to a person.
    """
    t = threshold_for_sensitivity(y_true, prob, target_sensitivity)
    lo = threshold_for_sensitivity(y_true, prob, band_level)
    hi = threshold_for_specificity(y_true, prob, band_level)
    return t, [float(min(lo, hi, t)), float(max(hi, t))]
