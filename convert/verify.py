"""Verification of a converted model with the device's own classifier code, and the fidelity gate.

Float (Keras) and converted (LiteRT, through `device.classifier.Classifier`)
outputs are compared on held-out crops: label agreement, probability
differences, differences of sensitivity, specificity and AUC, and the
correlation of the device's heatmap with the float model's reference
Grad-CAM (GradientTape); the same figures per class, and the list of flips
(crops whose label changed, with both probabilities). `Gate` turns those
numbers into pass or fail, and warns when too few crops were measured for
the gate to mean more than noise.
"""

from __future__ import annotations

import statistics
import time
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
    min_crops: int = 1000
    """Least held-out crops for the gate to measure more than noise (one positive crop of 240 is 0.42 points of
    sensitivity). Fewer is a warning in the report and model.json (`gate_crops_enough: false`), not a failure."""

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

    def warnings(self, v: dict) -> list[str]:
        """What makes the verification weaker than the gate pretends: too few crops (see `min_crops`)."""
        n = int(v["n"])
        if n >= self.min_crops:
            return []
        pos = (v.get("per_class") or {}).get("positive") or {}
        step = f"; one positive crop is {100 / pos['n']:.2f} points of sensitivity" if pos.get("n") else ""
        return [
            f"the gate measured only {n} held-out crops (fewer than {self.min_crops}){step}: "
            "its figures are too coarse to tell a faithful conversion from noise; verify on a larger held-out split"
        ]

    def class_failures(self, v: dict) -> dict[str, list[str]]:
        """The gate's thresholds applied to each class on its own (reported; the decision is `failures`)."""
        out = {}
        for c in (v.get("per_class") or {}).values():
            problems = []
            if c["label_agreement"] is not None and c["label_agreement"] < self.min_agreement:
                problems.append(f"label agreement {c['label_agreement']:.3f} < {self.min_agreement}")
            if c["delta"] is not None and abs(c["delta"]) > self.max_delta_sensitivity:
                problems.append(f"|delta {c['metric']}| {abs(c['delta']):.3f} > {self.max_delta_sensitivity}")
            cam = c.get("cam_correlation_mean")
            if cam is not None and cam < self.min_cam_correlation:
                problems.append(f"CAM correlation {cam:.3f} < {self.min_cam_correlation}")
            out[c["label"]] = problems
        return out

    def to_dict(self) -> dict:
        return asdict(self)


BATCH = 32
"""Crops per interpreter call when measuring (a thousand 300 px crops in one call would need gigabytes)."""


def device_outputs(bundle_dir, crops: np.ndarray, threads: int = 2) -> tuple[dict[str, np.ndarray], str]:
    """Run crops through the device classifier of a bundle folder; returns (outputs, input dtype name)."""
    with Classifier(load_bundle(bundle_dir), threads=threads) as clf:
        return batched_raw(clf, crops), clf.input_dtype


def batched_raw(clf: Classifier, crops: np.ndarray, batch: int = BATCH) -> dict[str, np.ndarray]:
    """`clf.raw` over crops in batches, concatenated."""
    parts = [clf.raw(crops[i : i + batch]) for i in range(0, len(crops), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def latency_ms(clf: Classifier, crop: np.ndarray, repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time (ms) of one crop (batch 1) through the device classifier, after `warmup` calls."""
    one = crop[None] if crop.ndim == 3 else crop[:1]
    for _ in range(warmup):
        clf.raw(one)
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        clf.raw(one)
        times.append((time.perf_counter() - t) * 1000)
    return float(statistics.median(times))


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
    names: list[str] | tuple[str, ...] | None = None,
    label_names: tuple[str, str] = ("negative", "positive"),
) -> dict:
    """Agreement and differences between float and converted outputs, overall and per class, and the flips.

    Args:
        names: each crop's file name, for the flips (None: flips name the crop by its index only).
        label_names: (negative, positive), as in model.json's labels.
    """
    pf, pq = float_out["probability"], quant_out["probability"]
    dp = np.abs(pf - pq)
    if reference_cams is None:  # signed CAM against signed CAM
        pairs = zip(float_out["cam"], quant_out["cam"], strict=True)
    else:  # the heatmap the device shows against the float model's Grad-CAM of the same class
        pairs = (
            (ref, class_heatmap(q, positive=bool(p >= threshold)))
            for ref, q, p in zip(reference_cams, quant_out["cam"], pf, strict=True)
        )
    per_crop = np.array([np.nan if c is None else c for c in (_pearson(a.ravel(), b.ravel()) for a, b in pairs)])
    corr = per_crop[np.isfinite(per_crop)]
    float_pos, quant_pos = pf >= threshold, pq >= threshold
    flipped = np.flatnonzero(float_pos != quant_pos)
    result = {
        "n": int(len(pf)),
        "label_agreement": float(np.mean(float_pos == quant_pos)),
        "mean_abs_dprob": float(dp.mean()),
        "max_abs_dprob": float(dp.max()),
        "cam_reference": "signed CAM"
        if reference_cams is None
        else "float Grad-CAM (GradientTape) of the predicted class",
        "cam_correlation_mean": float(np.mean(corr)) if len(corr) else None,
        "cam_correlation_min": float(np.min(corr)) if len(corr) else None,
        "cam_pairs": int(len(corr)),
        "flips_total": int(len(flipped)),
        "flips": [
            {
                "index": int(i),
                "file": None if names is None else str(names[i]),
                "label": None if labels is None else label_names[int(labels[i])],
                "float_probability": round(float(pf[i]), 6),
                "quantized_probability": round(float(pq[i]), 6),
                "float_label": label_names[int(float_pos[i])],
                "quantized_label": label_names[int(quant_pos[i])],
            }
            for i in flipped
        ],
    }
    if labels is not None:
        result["per_class"] = _per_class(np.asarray(labels).astype(int), float_pos, quant_pos, per_crop, label_names)
        mf, mq = binary_metrics(labels, pf, threshold), binary_metrics(labels, pq, threshold)
        result["float_metrics"], result["quantized_metrics"] = mf, mq
        for key in ("accuracy", "sensitivity", "specificity", "auc"):
            a = mq[key]["value"] if isinstance(mq[key], dict) else mq[key]
            b = mf[key]["value"] if isinstance(mf[key], dict) else mf[key]
            result[f"delta_{key}"] = None if a is None or b is None else float(a - b)
    return result


def _per_class(
    labels: np.ndarray,
    float_pos: np.ndarray,
    quant_pos: np.ndarray,
    per_crop_cam: np.ndarray,
    label_names: tuple[str, str],
) -> dict:
    """Each class's agreement, its rate (sensitivity on positives, specificity on negatives) in float and
    converted, the difference, its flips and its mean CAM correlation."""
    out = {}
    for role, cls, metric in (("positive", 1, "sensitivity"), ("negative", 0, "specificity")):
        sel = labels == cls
        n = int(sel.sum())
        cam = per_crop_cam[sel]
        cam = cam[np.isfinite(cam)]
        correct_f = (float_pos[sel] == bool(cls)).mean() if n else None
        correct_q = (quant_pos[sel] == bool(cls)).mean() if n else None
        out[role] = {
            "label": label_names[cls],
            "n": n,
            "label_agreement": float(np.mean(float_pos[sel] == quant_pos[sel])) if n else None,
            "flips": int(np.sum(float_pos[sel] != quant_pos[sel])),
            "metric": metric,
            "float": None if correct_f is None else float(correct_f),
            "quantized": None if correct_q is None else float(correct_q),
            "delta": None if correct_f is None else float(correct_q - correct_f),
            "cam_correlation_mean": float(cam.mean()) if len(cam) else None,
        }
    return out


def report(
    v: dict,
    mode: str,
    failures: list[str],
    warnings: list[str] | None = None,
    class_failures: dict[str, list[str]] | None = None,
    max_flips: int = 10,
) -> str:
    """A short readable report of one verification: the figures, per class, the first flips, the gate."""
    lines = [
        f"verification of {mode} on {v['n']} held-out crops (device classifier code):",
        f"  label agreement      {v['label_agreement']:.4f}",
        f"  |dp| mean / max      {v['mean_abs_dprob']:.4f} / {v['max_abs_dprob']:.4f}",
        f"  delta sens/spec/AUC  {fmt(v.get('delta_sensitivity'))} / {fmt(v.get('delta_specificity'))} / {fmt(v.get('delta_auc'))}",
        f"  CAM correlation      {fmt(v.get('cam_correlation_mean'))} (min {fmt(v.get('cam_correlation_min'))}, vs {v['cam_reference']})",
    ]
    for c in (v.get("per_class") or {}).values():
        within = (class_failures or {}).get(c["label"])
        lines.append(
            f"  {c['label']:<8} n={c['n']:<5} agreement {fmt(c['label_agreement'])}, {c['metric']} "
            f"{fmt(c['float'])} -> {fmt(c['quantized'])} (delta {fmt(c['delta'])}), CAM {fmt(c['cam_correlation_mean'])}, "
            f"{c['flips']} flip(s)"
            + (
                ""
                if within is None
                else (" [within the gate]" if not within else " [outside: " + "; ".join(within) + "]")
            )
        )
    flips = v.get("flips") or []
    if flips:
        lines.append(f"  flips ({v.get('flips_total', len(flips))}): crop, true label, float p -> converted p")
        for f in flips[:max_flips]:
            lines.append(
                f"    {f['file'] or '#' + str(f['index'])}  {f['label'] or '?'}  "
                f"{f['float_probability']:.3f} -> {f['quantized_probability']:.3f}"
            )
        if len(flips) > max_flips:
            lines.append(f"    ... {len(flips) - max_flips} more in the convert report")
    lines.extend(f"  warning: {w}" for w in warnings or ())
    lines.append("  gate: PASS" if not failures else "  gate: FAIL: " + "; ".join(failures))
    return "\n".join(lines)


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])
