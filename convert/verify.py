"""Verification of a converted model with the device's own classifier code, and the fidelity gate.

Float (Keras) and converted (LiteRT, through `device.classifier.Classifier`)
outputs are compared on held-out crops: label agreement, probability
differences, differences of sensitivity, specificity and AUC, and the
correlation of the device's heatmap with the float model's reference
Grad-CAM (GradientTape). `Gate` turns those numbers into pass or fail.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from device.bundle import load_bundle
from device.classifier import Classifier, class_heatmap
from training.metrics import binary_metrics, fmt


@dataclass(frozen=True)
class Gate:
    min_agreement: float = 0.99
    """Least fraction of held-out crops whose label is the same in float and converted model."""
    max_delta_sensitivity: float = 0.01
    """Largest |sensitivity(converted) - sensitivity(float)| (0.01 = one percentage point)."""
    min_cam_correlation: float = 0.9
    """Least mean Pearson correlation of the device heatmap with the float Grad-CAM."""

    def failures(self, v: dict) -> list[str]:
        """Human-readable reasons the verification fails this gate; empty when it passes."""
        out = []
        if v["label_agreement"] < self.min_agreement:
            out.append(f"label agreement {v['label_agreement']:.3f} < {self.min_agreement}")
        ds = v.get("delta_sensitivity")
        if ds is not None and abs(ds) > self.max_delta_sensitivity:
            out.append(f"|delta sensitivity| {abs(ds):.3f} > {self.max_delta_sensitivity}")
        cam = v.get("cam_correlation_mean")
        if cam is not None and cam < self.min_cam_correlation:
            out.append(f"CAM correlation {cam:.3f} < {self.min_cam_correlation}")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def device_outputs(bundle_dir, crops: np.ndarray) -> tuple[dict[str, np.ndarray], str]:
    """Run crops through the device classifier of a bundle folder; returns (outputs, input dtype name)."""
    with Classifier(load_bundle(bundle_dir)) as clf:
        return clf.raw(crops), clf.input_dtype


def reference_gradcam(
    model, crops: np.ndarray, float_prob: np.ndarray, threshold: float, batch: int = 16
) -> np.ndarray:
    """GradientTape Grad-CAM of the float model's predicted class for each crop."""
    from training.gradcam import grad_cam

    maps = []
    for i in range(0, len(crops), batch):
        sl = slice(i, i + batch)
        pos = grad_cam(model, crops[sl], positive=True)
        neg = grad_cam(model, crops[sl], positive=False)
        chosen = np.where((float_prob[sl] >= threshold)[:, None, None], pos, neg)
        maps.append(chosen)
    return np.concatenate(maps)


def compare(
    float_out: dict,
    quant_out: dict,
    labels: np.ndarray | None,
    threshold: float,
    reference_cams: np.ndarray | None = None,
) -> dict:
    """Agreement and differences between float and converted outputs."""
    pf, pq = float_out["probability"], quant_out["probability"]
    dp = np.abs(pf - pq)
    if reference_cams is None:  # signed CAM against signed CAM
        pairs = zip(float_out["cam"], quant_out["cam"], strict=True)
    else:  # the heatmap the device shows against the float model's Grad-CAM of the same class
        pairs = (
            (ref, class_heatmap(q, positive=bool(p >= threshold)))
            for ref, q, p in zip(reference_cams, quant_out["cam"], pf, strict=True)
        )
    corr = [c for c in (_pearson(a.ravel(), b.ravel()) for a, b in pairs) if c is not None]
    result = {
        "n": int(len(pf)),
        "label_agreement": float(np.mean((pf >= threshold) == (pq >= threshold))),
        "mean_abs_dprob": float(dp.mean()),
        "max_abs_dprob": float(dp.max()),
        "cam_reference": "signed CAM"
        if reference_cams is None
        else "float Grad-CAM (GradientTape) of the predicted class",
        "cam_correlation_mean": float(np.mean(corr)) if corr else None,
        "cam_correlation_min": float(np.min(corr)) if corr else None,
        "cam_pairs": len(corr),
    }
    if labels is not None:
        mf, mq = binary_metrics(labels, pf, threshold), binary_metrics(labels, pq, threshold)
        result["float_metrics"], result["quantized_metrics"] = mf, mq
        for key in ("accuracy", "sensitivity", "specificity", "auc"):
            a = mq[key]["value"] if isinstance(mq[key], dict) else mq[key]
            b = mf[key]["value"] if isinstance(mf[key], dict) else mf[key]
            result[f"delta_{key}"] = None if a is None or b is None else float(a - b)
    return result


def report(v: dict, mode: str, failures: list[str]) -> str:
    """A short readable report of one verification."""
    lines = [
        f"verification of {mode} on {v['n']} held-out crops (device classifier code):",
        f"  label agreement      {v['label_agreement']:.4f}",
        f"  |dp| mean / max      {v['mean_abs_dprob']:.4f} / {v['max_abs_dprob']:.4f}",
        f"  delta sens/spec/AUC  {fmt(v.get('delta_sensitivity'))} / {fmt(v.get('delta_specificity'))} / {fmt(v.get('delta_auc'))}",
        f"  CAM correlation      {fmt(v.get('cam_correlation_mean'))} (min {fmt(v.get('cam_correlation_min'))}, vs {v['cam_reference']})",
        "  gate: PASS" if not failures else "  gate: FAIL: " + "; ".join(failures),
    ]
    return "\n".join(lines)


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])
