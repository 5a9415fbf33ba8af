"""`leukocam convert` and `leukocam verify`: Keras model -> verified model bundle.

Convert measures the converted model against the float one with the device's
own classifier and refuses to write a bundle that fails the fidelity gate
(unless --force). `--quant auto` tries int8, then int8 with its worst layers
kept in float, then float16, then int16x8, and keeps the first that passes.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from device.bundle import load_bundle
from device.preprocess import PreprocessContract

SELECTIVE_LAYERS = 10
# Cheapest on a Pi first: int16x8 is near-lossless but runs on slow reference kernels, so it comes last.
AUTO_SEQUENCE = (("int8", 0), ("int8", SELECTIVE_LAYERS), ("float16", 0), ("int16x8", 0))


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


@dataclass
class RunData:
    """What convert and verify need from a training run and its dataset."""

    model: object
    info: dict
    train_metrics: dict
    contract: PreprocessContract
    calibration: np.ndarray
    held_out: np.ndarray
    """The gate's crops: the validation split (the test split is kept for reporting, once)."""
    labels: np.ndarray
    model_path: Path
    test_x: np.ndarray | None = None
    """The test split, measured once on the chosen bundle; None when DATA lacks it."""
    test_y: np.ndarray | None = None
    gate_split: str = "validation"


def load_run(model_path, data_dir, calibration: int = 200, extra_calibration=None, seed: int = 0) -> RunData:
    """Load the Keras model, its training.json, calibration crops (train split), the gate's crops (validation
    split) and the test crops (test split, reported once on the chosen bundle and never used to choose it)."""
    import keras

    from device.imaging import decode_image
    from device.preprocess import prepare_cell
    from training.datasets import load_images, read_dataset

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

    def part(name: str):
        return [by_path[p] for p in info.get("split_files", {}).get(name, []) if p in by_path]

    train_part, val_part, test_part = part("train"), part("val"), part("test")
    gate_part, gate_split = val_part, "validation"
    if not val_part:
        gate_part, gate_split = test_part, "test (the run has no validation split in DATA)"
    if not gate_part:
        gate_part, gate_split = samples, "all of DATA"
        click.echo("warning: the model's validation and test splits are not in DATA; verifying on all of DATA, which "
                   "may include training images and flatter the converted model", err=True)
    if calibration > 0:
        xc, yc, _, _ = load_images(train_part or samples, contract, um_per_px=info.get("data_um_per_px"))
        xc = xc[stratified_pick(yc, calibration, seed)]
    else:  # only --extra-calibration crops
        xc = np.zeros((0, contract.input_size, contract.input_size, 3), dtype=np.uint8)
    if extra_calibration:
        files = sorted(p for p in Path(extra_calibration).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
        extra = [prepare_cell(decode_image(p), contract) for p in files]
        if extra:
            xc = np.concatenate([xc, np.stack(extra)])
        click.echo(f"calibration: {len(extra)} extra crops from {extra_calibration}")
    um = info.get("data_um_per_px")
    xg, yg, _, _ = load_images(gate_part, contract, um_per_px=um)
    xt, yt = (load_images(test_part, contract, um_per_px=um)[:2]) if test_part and gate_part is not test_part else (None, None)
    return RunData(model, info, train_metrics, contract, xc, xg, yg, model_path, xt, yt, gate_split)


def base_meta(run: RunData, name: str | None, cam_shape) -> dict:
    from convert.bundle_writer import sha256_bytes
    from convert.tflite import SIGNATURE

    return {
        "name": name or run.model_path.parent.name,
        "synthetic": bool(run.train_metrics.get("synthetic_data", False)),
        "labels": run.info["labels"],
        "input_size": run.contract.input_size,
        "preprocess": run.contract.to_dict(),
        "signature": SIGNATURE,
        "input": {"name": "image", "channels": "RGB", "range": [0, 255],
                  "note": "Keras EfficientNet normalizes inside the graph; feed raw 0-255 pixels"},
        "outputs": {"probability": "probability", "logit": "logit", "cam": "cam"},
        "threshold": float(run.info["threshold"]),
        "review_band": run.info["review_band"],
        "cam": {"method": "CAM from the Dense head weights (equals Grad-CAM up to scale for GAP+Dense)",
                "layer": run.info.get("feature_layer", ""), "shape": list(cam_shape),
                "sign": "positive values = evidence for labels[1]; use -cam for labels[0]"},
        "training": {"data": run.info["data"], "options": run.info["options"],
                     "test_metrics": run.train_metrics.get("test")},
        "source_model_sha256": sha256_bytes(run.model_path.read_bytes()),
    }


def run_convert(model_path, data_dir, out_dir, mode: str = "int8", calibration: int = 200, extra_calibration=None,
                float_layers: int = 0, gate=None, force: bool = False, golden: int = 8, name: str | None = None,
                seed: int = 0, max_mb: float | None = None, parity_fields: int = 30) -> dict:
    """Convert, verify with the device classifier, gate, and write the bundle. Returns the verification.

    `parity_fields` SYNTHETIC fields also go through the device's whole field path (finder, crop,
    classifier) beside the training path on the same cells; a significant sensitivity loss larger than
    the gate's max_delta_sensitivity fails the gate too (0 skips the check).
    """
    from convert.bundle_writer import write_bundle
    from convert.tflite import convert, float_outputs, layer_errors
    from convert.verify import Gate, compare, device_outputs, reference_gradcam, report

    gate = gate or Gate()
    run = load_run(model_path, data_dir, calibration, extra_calibration, seed)
    threshold = float(run.info["threshold"])
    float_test = float_outputs(run.model, run.held_out)
    ref_cams = reference_gradcam(run.model, run.held_out, float_test["probability"], threshold)
    g_idx = stratified_pick(run.labels, golden, seed + 1)
    meta = base_meta(run, name, float_test["cam"].shape[1:3])
    attempts = AUTO_SEQUENCE if mode == "auto" else ((mode, float_layers),)
    worst: list[dict] = []
    tried = []
    chosen = None  # the last attempt that was verified: (mode, float layers, tflite, verification, outputs, dtype, failures)
    for attempt_mode, n_float in attempts:
        label = attempt_mode + (f" with {n_float} float layers" if n_float else "")
        if n_float and not worst:
            worst = layer_errors(run.model, run.calibration)
        keep_float = [w["tensor"] for w in worst[:n_float]]
        click.echo(f"converting: {label}, {len(run.calibration)} calibration crops ...")
        tflite = convert(run.model, run.calibration, attempt_mode, float_layers=keep_float or None)
        if max_mb is not None and len(tflite) > max_mb * 1e6:
            reason = f"model file {len(tflite) / 1e6:.1f} MB > {max_mb} MB limit"
            click.echo(f"  {label}: skipped, {reason}")
            tried.append({"mode": label, "passed": False, "failures": [reason], "bytes": len(tflite)})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            # A provisional bundle (float outputs as golden, loose tolerance) so the device classifier can load it.
            staging = write_bundle(Path(tmp) / "staging", tflite, {**meta, "quantization": {"mode": attempt_mode}},
                                   {"crops": run.held_out[g_idx], "probabilities": float_test["probability"][g_idx],
                                    "cams": float_test["cam"][g_idx]}, tolerance=1.0)
            quant_test, input_dtype = device_outputs(staging, run.held_out)
        verification = compare(float_test, quant_test, run.labels, threshold, ref_cams)
        failures = gate.failures(verification)
        click.echo(report(verification, label, failures))
        tried.append({"mode": label, "passed": not failures, "failures": failures,
                      "label_agreement": verification["label_agreement"], "bytes": len(tflite)})
        chosen = (attempt_mode, keep_float, tflite, verification, quant_test, input_dtype, failures)
        if not failures:
            break
    if chosen is None:
        raise click.ClickException(f"no mode fits the {max_mb} MB limit; no bundle was written")
    attempt_mode, keep_float, tflite, verification, quant_test, input_dtype, failures = chosen
    parity = None
    if parity_fields:
        parity = check_field_parity(tflite, meta, attempt_mode, parity_fields, gate.max_delta_sensitivity, seed)
        if not parity["passed"]:
            failures = [*failures, f"field path loses sensitivity: {parity['reason']}"]
    if failures:
        if not worst and attempt_mode == "int8":
            worst = layer_errors(run.model, run.calibration)
        if worst:
            click.echo("layers with the largest int8 quantization error (rmse in quantization steps):")
            for w in worst[:8]:
                click.echo(f"  {w['rmse_per_scale']:7.2f}  {w['op']:<16} {w['tensor'][:90]}")
        if not force:
            raise click.ClickException(
                "the converted model fails the fidelity gate; no bundle was written. Try: more or better "
                "calibration crops (--calibration, --extra-calibration), --float-layers N (selective int8), "
                "--quant int16x8|float16|auto; or --force to write it anyway (it will say so in model.json)"
            )
        click.echo(f"--force: writing the {attempt_mode} bundle although it fails the gate", err=True)
    meta["quantization"] = {"mode": attempt_mode, "float_layers": keep_float, "calibration_images": int(len(run.calibration)),
                            "input_type": input_dtype, "attempts": tried}
    meta["verification"] = verification
    meta["field_parity"] = parity
    meta["gate"] = {**gate.to_dict(), "passed": not failures, "failures": failures, "forced": bool(failures and force)}
    verification["split"] = run.gate_split
    meta["metrics"] = measure_test_split(run, tflite, meta, attempt_mode, threshold) or {
        "split": run.gate_split, "float": verification.get("float_metrics"), "quantized": verification.get("quantized_metrics")}
    if worst:
        meta["quantization"]["worst_layers"] = worst[:10]
    golden_set = {"crops": run.held_out[g_idx], "probabilities": quant_test["probability"][g_idx], "cams": quant_test["cam"][g_idx]}
    out = write_bundle(out_dir, tflite, meta, golden_set, tolerance=0.05)
    click.echo(f"bundle written to {out} ({len(tflite) / 1e6:.1f} MB, {meta['quantization']['mode']})")
    return verification


def _provisional_bundle(folder: Path, tflite: bytes, meta: dict, mode: str) -> Path:
    """A bundle the device's classifier can load for measuring (its blank golden crop is never self-tested)."""
    from convert.bundle_writer import write_bundle

    size = meta["input_size"]
    golden = {"crops": np.zeros((1, size, size, 3), np.uint8), "probabilities": np.zeros(1, np.float32),
              "cams": np.zeros((1, *meta["cam"]["shape"]), np.float32)}
    return write_bundle(folder / "provisional", tflite, {**meta, "quantization": {"mode": mode}}, golden, tolerance=1.0)


def measure_test_split(run: RunData, tflite: bytes, meta: dict, mode: str, threshold: float) -> dict | None:
    """Float and quantized metrics on the test split, measured once on the chosen bundle (None without a test split).

    The gate chose the mode on validation; the test split stays untouched until here, so its numbers are
    an honest estimate for the bundle that ships.
    """
    from convert.tflite import float_outputs
    from convert.verify import device_outputs
    from training.metrics import binary_metrics

    if run.test_x is None or not len(run.test_x):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        quant, _ = device_outputs(_provisional_bundle(Path(tmp), tflite, meta, mode), run.test_x)
    flt = float_outputs(run.model, run.test_x)
    return {"split": "test", "n": int(len(run.test_y)),
            "float": binary_metrics(run.test_y, flt["probability"], threshold),
            "quantized": binary_metrics(run.test_y, quant["probability"], threshold)}


def check_field_parity(tflite: bytes, meta: dict, mode: str, n_fields: int, max_loss: float, seed: int) -> dict:
    """The field-path parity of a converted model, through the device's own classifier (training.parity)."""
    from device.classifier import Classifier
    from training.parity import ParityGate, field_parity, parity_markdown

    with tempfile.TemporaryDirectory() as tmp:
        with Classifier(load_bundle(_provisional_bundle(Path(tmp), tflite, meta, mode)), threads=2) as clf:
            parity = field_parity(clf, n_fields=n_fields, seed=seed, gate=ParityGate(max_sensitivity_loss=max_loss))
    click.echo(parity_markdown(parity))
    return parity


def run_verify(bundle_dir, model_path, data_dir, gate=None) -> tuple[dict, list[str]]:
    """Re-verify an existing bundle against its float model on the model's held-out split."""
    from convert.tflite import float_outputs
    from convert.verify import Gate, compare, device_outputs, reference_gradcam, report

    gate = gate or Gate()
    bundle = load_bundle(bundle_dir)
    run = load_run(model_path, data_dir, calibration=2)
    threshold = bundle.threshold
    float_test = float_outputs(run.model, run.held_out)
    ref = reference_gradcam(run.model, run.held_out, float_test["probability"], threshold)
    quant_test, _ = device_outputs(bundle_dir, run.held_out)
    verification = compare(float_test, quant_test, run.labels, threshold, ref)
    failures = gate.failures(verification)
    click.echo(report(verification, bundle.meta["quantization"].get("mode", "?"), failures))
    return verification, failures


gate_options = [
    click.option("--min-agreement", type=float, default=0.99, show_default=True, help="Gate: least float/converted label agreement."),
    click.option("--max-delta-sensitivity", type=float, default=0.01, show_default=True, help="Gate: largest |Δ sensitivity|."),
    click.option("--min-cam-correlation", type=float, default=0.9, show_default=True, help="Gate: least CAM correlation with float Grad-CAM."),
]


def with_gate_options(f):
    for opt in reversed(gate_options):
        f = opt(f)
    return f


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The dataset the model was trained on (calibration from its train split, verification on its test split).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--quant", "mode", type=click.Choice(["int8", "int16x8", "float16", "float32", "auto"]), default="int8", show_default=True)
@click.option("--calibration", type=click.IntRange(0), default=200, show_default=True,
              help="Calibration crops from the train split, stratified by class (0: only --extra-calibration).")
@click.option("--extra-calibration", type=click.Path(exists=True, file_okay=False), default=None,
              help="A folder of extra calibration crops, e.g. cells captured on the rig.")
@click.option("--float-layers", type=int, default=0, show_default=True, help="int8: keep the N worst layers in float (selective).")
@with_gate_options
@click.option("--force", is_flag=True, help="Write the bundle even when the gate fails (model.json records it).")
@click.option("--max-mb", type=float, default=None, help="Skip modes whose model file is larger than this (e.g. for a small SD card).")
@click.option("--name", default=None, help="Model name shown on the dashboard.")
@click.option("--parity-fields", type=click.IntRange(0), default=30, show_default=True,
              help="SYNTHETIC fields run through the device's whole field path beside the training path (0: skip).")
def convert(model, data_dir, out_dir, mode, calibration, extra_calibration, float_layers, min_agreement,
            max_delta_sensitivity, min_cam_correlation, force, max_mb, name, parity_fields):
    """Convert MODEL (a .keras file from `leukocam train`) into a verified model bundle."""
    from convert.verify import Gate

    gate = Gate(min_agreement, max_delta_sensitivity, min_cam_correlation)
    run_convert(model, data_dir, out_dir, mode=mode, calibration=calibration, extra_calibration=extra_calibration,
                float_layers=float_layers, gate=gate, force=force, name=name, max_mb=max_mb,
                parity_fields=parity_fields)


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@with_gate_options
def verify(bundle, model_path, data_dir, min_agreement, max_delta_sensitivity, min_cam_correlation):
    """Check BUNDLE against its float MODEL on the held-out split, with the device's classifier code."""
    from convert.verify import Gate

    _, failures = run_verify(bundle, model_path, data_dir, Gate(min_agreement, max_delta_sensitivity, min_cam_correlation))
    if failures:
        raise SystemExit(1)


@click.command()
@click.option("--out", "out_dir", default="runs/bench", show_default=True, type=click.Path(file_okay=False))
@click.option("--size", default=300, show_default=True, help="Model input size in pixels (the paper's 300).")
@click.option("--repeats", default=5, show_default=True)
@click.option("--quick", is_flag=True, help="Small sizes and fewer repeats, to check that the benchmarks run.")
@click.option("--bundle", "bundle_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Bundle for the pipeline benchmark (default: the shipped demo bundle).")
@click.option("--only", type=click.Choice(["all", "models", "pipeline", "finder", "device", "training", "dashboard"]),
              default="all", show_default=True,
              help="device = pipeline and finder (no TensorFlow: what a Pi can run; the finder is then compared "
                   "with the pipeline's own model time).")
@click.option("--corpus", "corpus_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Finder stress corpus (from `leukocam finder-eval --build`); default: a small one built from "
                   "the repository's BCCD fields and synthetic fields.")
def bench(out_dir, size, repeats, quick, bundle_dir, only, corpus_dir):
    """Measure the capture pipeline, the finder, the dashboard, training throughput and the models in one run."""
    from convert.bench import (
        bench_finder,
        bench_models,
        bench_pipeline,
        bench_training,
        finder_markdown,
        pipeline_markdown,
        to_markdown,
        training_markdown,
        write_results,
    )
    from device.config import DEMO_BUNDLE

    if quick:
        size, repeats = 64, 2
    results = []
    model_ms_5 = None
    if only in ("all", "models"):
        click.echo(f"benchmarking models at {size} px ...")
        result = bench_models(size=size, repeats=repeats, threads=(1, 2) if quick else (1, 2, 4), keep_dir=out_dir)
        result["markdown"] = to_markdown(result)
        results.append(result)
        model_ms_5 = next(r["ms"] for r in result["rows"] if r["model"] == "tflite int8" and r["threads"] == 2
                          and r["batch"] == 5)
    if only in ("all", "pipeline", "device"):
        # The int8 bundle of this run (300 px) unless one is named; the demo bundle when models were not built.
        kept = Path(out_dir) / "int8"
        bundle = bundle_dir or (kept if only == "all" and kept.is_dir() else DEMO_BUNDLE)
        click.echo(f"benchmarking the capture pipeline with {bundle} ...")
        w, h, n = (1280, 960, 2) if quick else (4056, 3040, 5)
        result = bench_pipeline(bundle, width=w, height=h, cells=5, captures=n)
        result["markdown"] = pipeline_markdown(result)
        results.append(result)
        if model_ms_5 is None and result["found_cells"] == 5:
            model_ms_5 = result["model_ms"]  # the same bundle's pure model time on the 5 crops, this run
    if only in ("all", "finder", "device"):
        click.echo("benchmarking the white-cell finder ...")
        w, h = (1280, 960) if quick else (4056, 3040)
        kept = Path(out_dir) / "int8"
        side_by_side = bundle_dir or (kept if kept.is_dir() and only == "all" else None)
        result = bench_finder(model_ms_5, width=w, height=h, repeats=repeats, corpus=corpus_dir,
                              synth_fields=2 if quick else 5, bundle_dir=side_by_side)
        result["markdown"] = finder_markdown(result)
        results.append(result)
    if only in ("all", "dashboard"):
        from device.web.bench import bench_dashboard

        click.echo("benchmarking the dashboard ...")
        results.append(bench_dashboard(n_captures=500 if quick else 10_000, clients=4 if quick else 20,
                                       seconds=3 if quick else 20))
    if only in ("all", "training"):
        click.echo("benchmarking training throughput ...")
        result = bench_training(size=64 if quick else 96, steps=2 if quick else 5)
        result["markdown"] = training_markdown(result)
        results.append(result)
    path = write_results(results, out_dir)
    for r in results:
        click.echo(r["markdown"])
    click.echo(f"written to {path} and {path.with_suffix('.json')}")
