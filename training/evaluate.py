"""`leukocam evaluate`: the run report for an existing model on its own test split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training.datasets import DatasetError, load_images, read_dataset, subject_groups


def run_evaluate(
    model_path: str | Path, data_dir: str | Path, out_dir: str | Path | None = None, progress: bool = True
) -> dict:
    """Score the model on the test split recorded in its training.json; write metrics.json and report.md."""
    import keras

    from device.preprocess import PreprocessContract
    from training.metrics import binary_metrics, ece
    from training.report import write_report
    from training.train import _is_synthetic, predict_logits

    model_path = Path(model_path)
    info_path = model_path.parent / "training.json"
    if not model_path.is_file():
        raise DatasetError(f"{model_path}: model file not found")
    if not info_path.is_file():
        raise DatasetError(f"{info_path} not found: evaluate needs the run folder written by `leukocam train`")
    info = json.loads(info_path.read_text())
    out = Path(out_dir) if out_dir else model_path.parent / "evaluation"
    by_path = {str(s.path): s for s in read_dataset(data_dir)}
    test = [by_path[p] for p in info.get("split_files", {}).get("test", []) if p in by_path]
    if not test:
        raise DatasetError(f"{data_dir}: none of the model's test images are here; pass the dataset it was trained on")
    x, y, kept, _ = load_images(
        test, PreprocessContract.from_dict(info["preprocess"]), progress=progress, um_per_px=info.get("data_um_per_px")
    )
    model = keras.models.load_model(model_path, compile=False)
    logits = predict_logits(model, x)
    prob = 1 / (1 + np.exp(-logits))
    t = float(info.get("temperature", 1.0))
    metrics = {
        "synthetic_data": _is_synthetic(data_dir),
        "test": binary_metrics(y, prob, float(info["threshold"]), groups=subject_groups(kept)),
        "calibration": {
            "temperature": t,
            "val_ece": {"before": None, "after": None},
            "test_ece": {"before": ece(y, prob), "after": ece(y, 1 / (1 + np.exp(-logits / t)))},
        },
        "model": str(model_path),
    }
    metrics["report"] = str(write_report(out, model, x, y, prob, metrics, info, [str(s.path) for s in kept]))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
