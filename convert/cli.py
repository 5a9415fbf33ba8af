"""`leukocam convert` and `leukocam verify`: Keras model -> verified model bundle.

The conversion itself is `convert.build`: convert measures the converted model
against the float one with the device's own classifier and refuses to write a
bundle that fails the fidelity gate (unless --force). `--quant auto` climbs the
quantization ladder: int8, int8 with its worst layers kept in float, dynamic
range, float16, int16x8, timing each, and keeps the first that passes. This
module parses options, prints the progress and turns a ConvertError into a
one-line error (exit code 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from convert.errors import ConvertError
from convert.qat import FineTuneOptions

if TYPE_CHECKING:
    from convert.verify import Gate


def echo_progress(message: str, *, warning: bool = False) -> None:
    """convert.build's progress on the terminal: warnings on stderr."""
    click.echo(message, err=warning)


def run_convert(model_path, data_dir, out_dir, **options) -> dict:
    """What `leukocam convert` runs: `convert_bundle` with its progress printed; returns the verification.

    `options` are ConvertOptions fields (mode, calibration, extra_calibration, float_layers, fine_tuning, gate,
    force, golden, name, seed, max_mb, parity_fields).

    Raises:
        click.ClickException: a ConvertError (no bundle was written).
    """
    from convert.build import ConvertOptions, convert_bundle

    try:
        result = convert_bundle(model_path, data_dir, out_dir, ConvertOptions(**options), progress=echo_progress)
    except ConvertError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"bundle written to {result.bundle_dir} ({result.tflite_bytes / 1e6:.1f} MB, {result.mode})")
    return result.verification


def run_verify(bundle_dir, model_path, data_dir, gate: Gate | None = None) -> tuple[dict, list[str]]:
    """What `leukocam verify` runs: `verify_bundle` with its report printed; returns (verification, failures).

    Raises:
        click.ClickException: a ConvertError (the model's run folder cannot be read).
    """
    from convert.build import verify_bundle

    try:
        result = verify_bundle(bundle_dir, model_path, data_dir, gate, progress=echo_progress)
    except ConvertError as exc:
        raise click.ClickException(str(exc)) from None
    return dict(result.verification), list(result.failures)


gate_options = [
    click.option(
        "--min-agreement",
        type=float,
        default=0.99,
        show_default=True,
        help="Gate: least float/converted label agreement.",
    ),
    click.option(
        "--max-delta-sensitivity", type=float, default=0.01, show_default=True, help="Gate: largest |Δ sensitivity|."
    ),
    click.option(
        "--min-cam-correlation",
        type=float,
        default=0.9,
        show_default=True,
        help="Gate: least CAM correlation with float Grad-CAM.",
    ),
    click.option(
        "--min-gate-crops",
        type=click.IntRange(0),
        default=1000,
        show_default=True,
        help="Gate: least held-out crops for its figures to mean more than noise (fewer: a warning in the "
        "report and model.json, not a failure).",
    ),
]


def with_gate_options(f):
    for opt in reversed(gate_options):
        f = opt(f)
    return f


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="The dataset the model was trained on (calibration from its train split, verification on its test split).",
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option(
    "--quant",
    "mode",
    type=click.Choice(["int8", "int8-qat", "dynamic", "int16x8", "float16", "float32", "auto"]),
    default="int8",
    show_default=True,
    help="int8-qat: int8 after quantization-aware fine-tuning (minutes; see --qat-*). auto: int8, int8-qat, "
    "int8 with 10 float layers, dynamic, float16, int16x8 (fastest first), each timed; the first that passes "
    "the gate is kept.",
)
@click.option(
    "--calibration",
    type=click.IntRange(0),
    default=200,
    show_default=True,
    help="Calibration crops from the train split, stratified by class (0: only --extra-calibration).",
)
@click.option(
    "--extra-calibration",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="A folder of extra calibration crops, e.g. cells captured on the rig.",
)
@click.option(
    "--float-layers", type=int, default=0, show_default=True, help="int8: keep the N worst layers in float (selective)."
)
@click.option(
    "--qat-epochs",
    type=click.IntRange(1),
    default=FineTuneOptions.epochs,
    show_default=True,
    help="int8-qat: passes over the fine-tuning crops (each in a random rotation or mirror image).",
)
@click.option(
    "--qat-crops",
    type=click.IntRange(2),
    default=FineTuneOptions.max_crops,
    show_default=True,
    help="int8-qat: train-split crops to fine-tune on (stratified by class).",
)
@click.option(
    "--qat-lr",
    type=click.FloatRange(0, min_open=True),
    default=FineTuneOptions.learning_rate,
    show_default=True,
    help="int8-qat: Adam's starting learning rate (cosine decay).",
)
@click.option(
    "--qat-clip",
    type=click.FloatRange(0.99, 1.0),
    default=FineTuneOptions.clip_quantile,
    show_default=True,
    help="int8-qat: clip each batch-norm output at this quantile of its calibration values (1: no clipping).",
)
@with_gate_options
@click.option("--force", is_flag=True, help="Write the bundle even when the gate fails (model.json records it).")
@click.option(
    "--max-mb",
    type=float,
    default=None,
    help="Skip modes whose model file is larger than this (e.g. for a small SD card).",
)
@click.option("--name", default=None, help="Model name shown on the dashboard.")
@click.option(
    "--parity-fields",
    type=click.IntRange(0),
    default=30,
    show_default=True,
    help="SYNTHETIC fields run through the device's whole field path beside the training path (0: skip).",
)
def convert(
    model,
    data_dir,
    out_dir,
    mode,
    calibration,
    extra_calibration,
    float_layers,
    qat_epochs,
    qat_crops,
    qat_lr,
    qat_clip,
    min_agreement,
    max_delta_sensitivity,
    min_cam_correlation,
    min_gate_crops,
    force,
    max_mb,
    name,
    parity_fields,
):
    """Convert MODEL (a .keras file from `leukocam train`) into a verified model bundle."""
    from convert.verify import Gate

    gate = Gate(min_agreement, max_delta_sensitivity, min_cam_correlation, min_gate_crops)
    run_convert(
        model,
        data_dir,
        out_dir,
        mode=mode,
        calibration=calibration,
        extra_calibration=extra_calibration,
        float_layers=float_layers,
        fine_tuning=FineTuneOptions(
            epochs=qat_epochs, learning_rate=qat_lr, max_crops=qat_crops, clip_quantile=qat_clip
        ),
        gate=gate,
        force=force,
        name=name,
        max_mb=max_mb,
        parity_fields=parity_fields,
    )


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@with_gate_options
def verify(bundle, model_path, data_dir, min_agreement, max_delta_sensitivity, min_cam_correlation, min_gate_crops):
    """Check BUNDLE against its float MODEL on the held-out split, with the device's classifier code."""
    from convert.verify import Gate

    _, failures = run_verify(
        bundle, model_path, data_dir, Gate(min_agreement, max_delta_sensitivity, min_cam_correlation, min_gate_crops)
    )
    if failures:
        raise SystemExit(1)


@click.command()
@click.option("--out", "out_dir", default="runs/bench", show_default=True, type=click.Path(file_okay=False))
@click.option("--size", default=300, show_default=True, help="Model input size in pixels (the paper's 300).")
@click.option(
    "--ladder-size",
    type=click.IntRange(16),
    default=None,
    help="Input size for the quantization ladder's per-crop latencies (default: the shipped demo bundle's).",
)
@click.option("--repeats", default=5, show_default=True)
@click.option("--quick", is_flag=True, help="Small sizes and fewer repeats, to check that the benchmarks run.")
@click.option(
    "--bundle",
    "bundle_dir",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Bundle for the pipeline benchmark (default: the shipped demo bundle).",
)
@click.option(
    "--only",
    type=click.Choice(["all", "models", "pipeline", "finder", "device", "training", "dashboard"]),
    default="all",
    show_default=True,
    help="device = pipeline and finder (no TensorFlow: what a Pi can run; the finder is then compared "
    "with the pipeline's own model time).",
)
@click.option(
    "--corpus",
    "corpus_dir",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Finder stress corpus (from `leukocam finder-eval --build`); default: a small one built from "
    "the repository's BCCD fields and synthetic fields.",
)
def bench(out_dir, size, ladder_size, repeats, quick, bundle_dir, only, corpus_dir):
    """Measure the capture pipeline, the finder, the dashboard, training throughput and the models in one run."""
    from convert.bench import (
        LADDER,
        bench_finder,
        bench_models,
        bench_multiworker,
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
        ladder_size = ladder_size or size
    elif ladder_size is None:  # the architecture and size the appliance ships with
        ladder_size = json.loads((DEMO_BUNDLE / "model.json").read_text())["input_size"]
    results = []
    model_ms_5 = None
    if only in ("all", "models"):
        click.echo(f"benchmarking models at {size} px ...")
        # --quick leaves out int8-selective (QuantizationDebugger runs); `make bench` times the whole ladder.
        ladder = tuple(m for m in LADDER if m != "int8-selective") if quick else LADDER
        result = bench_models(
            size=size,
            repeats=repeats,
            threads=(1, 2) if quick else (1, 2, 4),
            keep_dir=out_dir,
            ladder=ladder,
            ladder_size=ladder_size,
        )
        result["markdown"] = to_markdown(result)
        results.append(result)
        model_ms_5 = next(
            r["ms"] for r in result["rows"] if r["model"] == "tflite int8" and r["threads"] == 2 and r["batch"] == 5
        )
    if only in ("all", "pipeline", "device"):
        # The int8 bundle of this run (300 px) unless one is named; the demo bundle when models were not built.
        kept = Path(out_dir) / "int8"
        bundle = bundle_dir or (kept if only == "all" and kept.is_dir() else DEMO_BUNDLE)
        click.echo(f"benchmarking the capture pipeline with {bundle} ...")
        w, h, n = (1280, 960, 2) if quick else (4056, 3040, 11)
        result = bench_pipeline(bundle, width=w, height=h, cells=5, captures=n)
        result["markdown"] = pipeline_markdown(result)
        from device.pi_bench import budget_markdown  # within or over the Pi 4 budgets, and by how much

        result["markdown"] += "\n" + budget_markdown(result)
        results.append(result)
        if model_ms_5 is None and result["found_cells"] == 5:
            model_ms_5 = result["model_ms"]  # the same bundle's pure model time on the 5 crops, this run
    if only in ("all", "finder", "device"):
        click.echo("benchmarking the white-cell finder ...")
        w, h = (1280, 960) if quick else (4056, 3040)
        kept = Path(out_dir) / "int8"
        side_by_side = bundle_dir or (kept if kept.is_dir() and only == "all" else None)
        result = bench_finder(
            model_ms_5,
            width=w,
            height=h,
            repeats=repeats,
            corpus=corpus_dir,
            synth_fields=2 if quick else 5,
            bundle_dir=side_by_side,
        )
        result["markdown"] = finder_markdown(result)
        results.append(result)
    if only in ("all", "dashboard"):
        from device.web.load_bench import bench_dashboard

        click.echo("benchmarking the dashboard ...")
        results.append(
            bench_dashboard(n_captures=500 if quick else 10_000, clients=4 if quick else 20, seconds=3 if quick else 20)
        )
    if only in ("all", "training"):
        click.echo("benchmarking training throughput ...")
        result = bench_training(size=64 if quick else 96, steps=2 if quick else 5)
        click.echo("benchmarking multi-worker training: 1 and 2 workers on loopback ...")
        result["multiworker"] = bench_multiworker(epochs=2 if quick else 3)
        result["markdown"] = training_markdown(result)
        results.append(result)
    path = write_results(results, out_dir)
    for r in results:
        click.echo(r["markdown"])
    click.echo(f"written to {path} and {path.with_suffix('.json')}")
