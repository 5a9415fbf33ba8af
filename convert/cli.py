"""`leukocam convert`: Keras model -> verified model bundle."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import numpy as np

from device.preprocess import PreprocessContract


def stratified_pick(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of up to n items, half from each class where possible."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        picks.append(idx[: max(1, n // 2)])
    out = np.concatenate(picks)
    rng.shuffle(out)
    return out


def run_convert(model_path, data_dir, out_dir, mode: str = "int8", calibration: int = 200, golden: int = 8,
                min_agreement: float = 0.95, force: bool = False, name: str | None = None, seed: int = 0) -> dict:
    """Convert, verify with the device classifier, and write the bundle. Returns model.json's verification part."""
    import keras

    from convert.bundle_writer import sha256_bytes, write_bundle
    from convert.tflite import SIGNATURE, convert, float_outputs
    from convert.verify import compare, device_outputs
    from training.datasets import Sample, load_images, read_dataset
    from training.metrics import fmt

    model_path = Path(model_path)
    info_path = model_path.parent / "training.json"
    if not info_path.is_file():
        raise click.ClickException(f"{info_path} not found: convert needs the run folder written by `leukocam train`")
    info = json.loads(info_path.read_text())
    metrics_path = model_path.parent / "metrics.json"
    train_metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    contract = PreprocessContract.from_dict(info["preprocess"])
    model = keras.models.load_model(model_path, compile=False)

    samples = read_dataset(data_dir)
    by_path = {str(s.path): s for s in samples}
    def part(name: str) -> list[Sample]:
        return [by_path[p] for p in info.get("split_files", {}).get(name, []) if p in by_path]
    calib_samples, held_out = part("train") or samples, part("test") or samples
    xc, yc, _, _ = load_images(calib_samples, contract)
    xc = xc[stratified_pick(yc, calibration, seed)]
    xt, yt, _, _ = load_images(held_out, contract)

    click.echo(f"converting ({mode}, {len(xc)} calibration crops) ...")
    tflite = convert(model, xc, mode)
    threshold = float(info["threshold"])
    float_test = float_outputs(model, xt)
    g_idx = stratified_pick(yt, golden, seed + 1)
    meta = {
        "name": name or model_path.parent.name,
        "synthetic": bool(train_metrics.get("synthetic_data", False)),
        "labels": info["labels"],
        "input_size": contract.input_size,
        "preprocess": contract.to_dict(),
        "signature": SIGNATURE,
        "input": {"name": "image", "dtype": "uint8", "channels": "RGB", "range": [0, 255],
                  "note": "Keras EfficientNet normalizes inside the graph; feed raw 0-255 pixels"},
        "outputs": {"probability": "probability", "logit": "logit", "cam": "cam"},
        "threshold": threshold,
        "review_band": info["review_band"],
        "cam": {"method": "CAM from the Dense head weights (equals Grad-CAM up to scale for GAP+Dense)",
                "layer": info.get("feature_layer", ""), "shape": list(float_test["cam"].shape[1:3]),
                "sign": "positive values = evidence for labels[1]; use -cam for labels[0]"},
        "quantization": {"mode": mode, "calibration_images": int(len(xc)), "input_type": "uint8" if mode == "int8" else "float32"},
        "training": {"data": info["data"], "options": info["options"], "test_metrics": train_metrics.get("test")},
        "source_model_sha256": sha256_bytes(model_path.read_bytes()),
    }
    with tempfile.TemporaryDirectory() as tmp:
        # A provisional bundle whose golden outputs are the float ones, so the device classifier can load it.
        staging = write_bundle(Path(tmp) / "staging", tflite, meta,
                               {"crops": xt[g_idx], "probabilities": float_test["probability"][g_idx],
                                "cams": float_test["cam"][g_idx]}, tolerance=1.0)
        quant_test = device_outputs(staging, xt)
    verification = compare(float_test, quant_test, yt, threshold)
    meta["verification"] = verification
    meta["metrics"] = {"float": verification.get("float_metrics"), "quantized": verification.get("quantized_metrics")}
    click.echo(f"verification on {verification['n']} held-out crops: agreement {verification['label_agreement']:.3f}, "
               f"mean |dp| {verification['mean_abs_dprob']:.4f}, max |dp| {verification['max_abs_dprob']:.4f}, "
               f"CAM r {fmt(verification['cam_correlation_mean'])}")
    if verification["label_agreement"] < min_agreement and not force:
        raise click.ClickException(
            f"float/{mode} label agreement {verification['label_agreement']:.3f} is below {min_agreement}; "
            "no bundle written. Use more calibration images, another --quant mode, or --force to write it anyway"
        )
    golden_set = {"crops": xt[g_idx], "probabilities": quant_test["probability"][g_idx], "cams": quant_test["cam"][g_idx]}
    out = write_bundle(out_dir, tflite, meta, golden_set, tolerance=0.05)
    click.echo(f"bundle written to {out} ({len(tflite) / 1e6:.1f} MB)")
    return verification


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The dataset the model was trained on (calibration from its train split, verification on its test split).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--quant", "mode", type=click.Choice(["int8", "float32"]), default="int8", show_default=True)
@click.option("--calibration", type=int, default=200, show_default=True, help="Calibration crops, stratified by class.")
@click.option("--min-agreement", type=float, default=0.95, show_default=True, help="Refuse the bundle below this float/quantized label agreement.")
@click.option("--force", is_flag=True, help="Write the bundle even when verification fails.")
def convert(model, data_dir, out_dir, mode, calibration, min_agreement, force):
    """Convert MODEL (a .keras file from `leukocam train`) into a model bundle."""
    run_convert(model, data_dir, out_dir, mode=mode, calibration=calibration, min_agreement=min_agreement, force=force)
