"""Run report: report.md plus ROC, confusion-matrix, reliability and Grad-CAM plots, written next to the model.

Used after training and by `leukocam evaluate`. Every page says SYNTHETIC when
the data is synthetic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.metrics import fmt, reliability

SYNTHETIC_BANNER = "**SYNTHETIC DATA: these numbers say nothing about real blood cells.**"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(text: str, synthetic: bool) -> str:
    return f"{text} [SYNTHETIC]" if synthetic else text


def plot_roc(y: np.ndarray, prob: np.ndarray, threshold: float, path: Path, synthetic: bool) -> None:
    plt = _plt()
    order = np.argsort(-prob)
    ys = np.asarray(y)[order]
    tpr = np.concatenate([[0], np.cumsum(ys) / max(1, ys.sum())])
    fpr = np.concatenate([[0], np.cumsum(1 - ys) / max(1, (1 - ys).sum())])
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label="ROC")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    pred = prob >= threshold
    sens = (pred & (y == 1)).sum() / max(1, (y == 1).sum())
    fpr_t = (pred & (y == 0)).sum() / max(1, (y == 0).sum())
    ax.plot([fpr_t], [sens], "o", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(_title("ROC (test)", synthetic))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: dict, path: Path, synthetic: bool) -> None:
    plt = _plt()
    m = np.array([[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center")
    ax.set_xticks([0, 1], ["normal", "blast"])
    ax.set_yticks([0, 1], ["normal", "blast"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(_title("Confusion matrix (test)", synthetic))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(
    y: np.ndarray,
    prob: np.ndarray,
    path: Path,
    synthetic: bool,
    temperature: float | None = None,
    logits: np.ndarray | None = None,
) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    curves = [("uncalibrated", prob)]
    if temperature is not None and logits is not None:
        curves.append((f"T = {temperature:.2f}", 1 / (1 + np.exp(-logits / temperature))))
    for name, p in curves:
        bins = [b for b in reliability(y, p) if b["n"]]
        ax.plot([b["mean_prob"] for b in bins], [b["frac_pos"] for b in bins], "o-", label=name)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("fraction blast")
    ax.set_title(_title("Reliability (test)", synthetic))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_gradcam_grid(
    model,
    images: np.ndarray,
    y: np.ndarray,
    prob: np.ndarray,
    threshold: float,
    path: Path,
    synthetic: bool,
    per_kind: int = 3,
) -> dict:
    """Up to per_kind TP, FP, TN, FN test crops with their Grad-CAM (of the predicted class) overlaid."""
    from training.gradcam import grad_cam

    plt = _plt()
    pred = prob >= threshold
    kinds = {"TP": pred & (y == 1), "FP": pred & (y == 0), "TN": ~pred & (y == 0), "FN": ~pred & (y == 1)}
    fig, axes = plt.subplots(4, per_kind, figsize=(2.2 * per_kind, 9), squeeze=False)
    shown = {}
    for row, (kind, mask) in enumerate(kinds.items()):
        idx = np.flatnonzero(mask)[:per_kind]
        shown[kind] = int(mask.sum())
        cams = grad_cam(model, images[idx], positive=kind in ("TP", "FP")) if len(idx) else []
        for col in range(per_kind):
            ax = axes[row][col]
            ax.axis("off")
            if col < len(idx):
                ax.imshow(images[idx[col]])
                cam = cams[col]
                ax.imshow(
                    cam / (cam.max() + 1e-9), cmap="jet", alpha=0.4, extent=(0, images.shape[2], images.shape[1], 0)
                )
                ax.set_title(f"{kind} p={prob[idx[col]]:.2f}", fontsize=8)
            elif col == 0:
                ax.set_title(f"{kind}: none", fontsize=8)
    fig.suptitle(_title("Grad-CAM on test crops", synthetic))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return shown


def _duplicates_line(dup: dict | None) -> list[str]:
    """The report's line on duplicate images (training.datasets.duplicate_summary); none for runs made before."""
    if not dup:
        return []
    if not dup.get("groups"):
        return [f"Duplicates ({dup.get('rule', '?')}): none found."]
    return [
        f"Duplicates ({dup.get('rule', '?')}): {dup['groups']} groups, {dup['images']} images, "
        f"{dup.get('groups_across_subjects', 0)} of them across subjects; each group is kept in one split, and "
        f"{dup.get('subjects_joined', 0)} subjects that share one are split together "
        f"({dup.get('split_units', '?')} split units)."
    ]


def write_report(
    out: str | Path,
    model,
    images: np.ndarray,
    y: np.ndarray,
    prob: np.ndarray,
    metrics: dict,
    info: dict,
    paths: list[str] | None = None,
) -> Path:
    """Write report.md and its PNGs into out; returns the report path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    synthetic = bool(metrics.get("synthetic_data"))
    t = metrics["test"]
    threshold = t["threshold"]
    temperature = info.get("temperature")
    plot_roc(y, prob, threshold, out / "roc.png", synthetic)
    plot_confusion(t["confusion"], out / "confusion_matrix.png", synthetic)
    logits = np.log(np.clip(prob, 1e-12, 1)) - np.log(np.clip(1 - prob, 1e-12, 1))
    plot_reliability(y, prob, out / "reliability.png", synthetic, temperature, logits)
    plot_gradcam_grid(model, images, y, prob, threshold, out / "gradcam_grid.png", synthetic)

    def prop(name: str) -> str:
        m = t[name]
        ci = f" (95% CI {fmt(m['ci95'][0])}-{fmt(m['ci95'][1])})" if m["ci95"] else ""
        return f"| {name} | {fmt(m['value'])}{ci} | {m['n']} |"

    auc_ci = t.get("auc_ci95")
    cal = metrics.get("calibration", {})
    lines = [f"# LeukoCam run report{' [SYNTHETIC]' if synthetic else ''}", ""]
    if synthetic:
        lines += [SYNTHETIC_BANNER, ""]
    data = info.get("data", {})
    lines += [
        f"Data: {data.get('root', '?')}: {data.get('images', '?')} images, {data.get('per_class', {})}, "
        f"{data.get('subjects', 0)} subjects; split by {data.get('split_by', '?')}.",
        *_duplicates_line(data.get("duplicates")),
        f"Backbone {info.get('options', {}).get('backbone', '?')}, stages {info.get('options', {}).get('stages', 1)}, "
        f"balance {info.get('options', {}).get('balance', '?')}.",
        "",
        f"## Held-out test ({t['n']} images), threshold {threshold:.4f}, review band "
        f"{[round(v, 4) for v in info.get('review_band', [])]}",
        "",
        "| metric | value | n |",
        "|---|---|---|",
        *[prop(k) for k in ("accuracy", "sensitivity", "specificity", "ppv", "npv")],
        f"| F1 (blast) | {fmt(t.get('f1'))} | |",
        f"| weighted F1 (C-NMC metric) | {fmt(t.get('f1_weighted'))} | |",
        f"| ROC AUC | {fmt(t.get('auc'))}"
        + (f" (95% CI {fmt(auc_ci[0])}-{fmt(auc_ci[1])})" if auc_ci else "")
        + " | |",
        "",
        f"Confusion: {t['confusion']}.",
        "",
        f"Confidence intervals: {t.get('ci_method', 'Wilson score (cells treated as independent)')}.",
        "",
    ]
    op = metrics.get("operating_point")
    if op:
        lines += [f"Operating point: {op.get('rule')}.", ""]
    if cal:
        lines += [
            f"Calibration: temperature {fmt(cal.get('temperature'))}; validation ECE "
            f"{fmt(cal['val_ece']['before'])} -> {fmt(cal['val_ece']['after'])}, test ECE "
            f"{fmt(cal['test_ece']['before'])} -> {fmt(cal['test_ece']['after'])} (10 bins). The threshold "
            "and review band apply to the uncalibrated probability the device computes.",
            "",
        ]
    bal = metrics.get("balance")
    if bal:
        lines += [f"Balancing: {bal}.", ""]
    lines += [
        "![training curves](training_curves.png)",
        "![ROC](roc.png)",
        "![confusion](confusion_matrix.png)",
        "![reliability](reliability.png)",
        "![Grad-CAM](gradcam_grid.png)",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
