"""`leukocam convert` / `verify`: the fidelity gate really gates, other modes load on the device."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from device.bundle import load_bundle
from device.classifier import Classifier
from device.imaging import atomic_write_bytes, encode_image

pytestmark = [pytest.mark.slow, pytest.mark.tf]
pytest.importorskip("tensorflow")

OPEN_GATE = dict(min_agreement=0.0, max_delta_sensitivity=1.0, min_cam_correlation=-1.0)


def test_gate_fails_on_blank_calibration_and_writes_nothing(small_run, tmp_path):
    from convert.cli import run_convert
    from convert.verify import Gate

    root, data, metrics = small_run
    assert metrics["test"]["accuracy"]["value"] >= 0.7, "the gate test needs a model that discriminates"
    # Calibrated properly, the same model passes the default gate: the failure below is the calibration's.
    good = run_convert(root / "run" / "model.keras", data, tmp_path / "good", calibration=64)
    assert good["label_agreement"] >= 0.99
    blank = tmp_path / "blank"
    for i in range(40):
        atomic_write_bytes(blank / f"blank_{i:02d}.png", encode_image(np.zeros((64, 64, 3), np.uint8), "PNG"))
    out = tmp_path / "bundle"
    with pytest.raises(click.ClickException, match="fails the fidelity gate"):
        run_convert(root / "run" / "model.keras", data, out, calibration=0, extra_calibration=blank,
                    gate=Gate(min_agreement=0.99, max_delta_sensitivity=0.01, min_cam_correlation=0.9))
    assert not out.exists(), "a failed gate must not leave a bundle"
    assert not list(tmp_path.glob(".bundle.*")), "nor a half-written temp folder"


def test_convert_records_verification_and_verify_reproduces_it(tiny_run, tmp_path):
    from convert.cli import run_convert, run_verify
    from convert.verify import Gate

    root, data, _ = tiny_run
    model = root / "run" / "model.keras"
    out = tmp_path / "bundle"
    v = run_convert(model, data, out, calibration=48, gate=Gate(**OPEN_GATE))
    meta = json.loads((out / "model.json").read_text())
    assert meta["gate"]["passed"] and meta["quantization"]["mode"] == "int8"
    assert meta["quantization"]["input_type"] == "uint8"
    assert meta["verification"]["label_agreement"] == pytest.approx(v["label_agreement"])
    for key in ("delta_sensitivity", "delta_specificity", "delta_auc", "mean_abs_dprob", "max_abs_dprob", "cam_correlation_mean"):
        assert key in meta["verification"]
    again, failures = run_verify(out, model, data, Gate(**OPEN_GATE))
    assert failures == []
    assert again["label_agreement"] == pytest.approx(v["label_agreement"])
    assert again["mean_abs_dprob"] == pytest.approx(v["mean_abs_dprob"], abs=1e-6)
    # An impossible gate makes `leukocam verify` exit non-zero with a readable report.
    from device.cli import cli

    result = CliRunner().invoke(cli, ["verify", str(out), "--model", str(model), "--data", str(data),
                                      "--min-cam-correlation", "1.01"])
    assert result.exit_code == 1 and "gate: FAIL" in result.output and "CAM correlation" in result.output


@pytest.mark.parametrize("mode,float_layers", [("float16", 0), ("int8", 3)])
def test_fallback_modes_run_on_the_device(tiny_run, tmp_path, mode, float_layers):
    from convert.cli import run_convert
    from convert.verify import Gate

    root, data, _ = tiny_run
    out = tmp_path / "bundle"
    v = run_convert(root / "run" / "model.keras", data, out, mode=mode, float_layers=float_layers, calibration=32,
                    gate=Gate(**OPEN_GATE))
    bundle = load_bundle(out)
    assert bundle.meta["quantization"]["mode"] == mode
    assert len(bundle.meta["quantization"]["float_layers"]) == float_layers
    if float_layers:
        assert bundle.meta["quantization"]["worst_layers"][0]["rmse_per_scale"] > 0
    with Classifier(bundle, threads=1) as clf:
        assert clf.self_test().passed
    if mode == "float16":
        assert v["max_abs_dprob"] < 0.01  # float16 weights barely move the outputs


def test_model_benchmark_runs_and_reports_ratios(tmp_path):
    from convert.bench import bench_models, to_markdown, write_results

    result = bench_models(size=32, modes=("int8", "float32"), batches=(1, 2), threads=(1, 2), repeats=1, calibration=2)
    models = {r["model"] for r in result["rows"]}
    assert models == {"keras float32", "tflite int8", "tflite float32"}
    sizes = {r["model"]: r["size_mb"] for r in result["rows"] if r["size_mb"]}
    assert sizes["tflite int8"] < sizes["tflite float32"] / 2  # int8 weights are a quarter of float32
    for r in result["rows"]:
        assert r["ms"] > 0 and r["vs_keras"] > 0
    result["markdown"] = to_markdown(result)
    path = write_results([result], tmp_path)
    assert "tflite int8" in path.read_text() and json.loads(path.with_suffix(".json").read_text())[0]["cpu"]


def test_finder_benchmark_reports_the_ratio_and_the_stress_table():
    from convert.bench import bench_finder, finder_markdown

    stress = Path(__file__).parent / "data" / "stress"
    r = bench_finder(model_ms_5=10.0, width=640, height=480, cells=2, repeats=1, corpus=stress)
    assert r["found_cells"] == r["true_cells"] == 2
    assert r["find_ms"] > 0 and r["find_vs_model"] == r["find_ms"] / 10.0
    assert {row["condition"] for row in r["stress"]} >= {"bccd-mgg", "synth-blast-dense"}
    md = finder_markdown(r)
    assert "finder / model" in md and "| bccd-mgg |" in md


def test_pipeline_and_training_benchmarks_run(demo_bundle_dir):
    from convert.bench import bench_pipeline, bench_training, pipeline_markdown, training_markdown

    p = bench_pipeline(demo_bundle_dir, width=1280, height=960, cells=2, captures=1)
    assert p["found_cells"] == p["true_cells"] == 2
    for stage in ("capture", "qc", "find", "crop", "classify", "cam", "encode", "store", "total"):
        assert p["median_ms"][stage] >= 0
    assert 0 < p["model_share"] <= 1.5 and p["peak_rss_mb"] > 50
    assert p["after_frame_ms"] > 0 and p["after_frame_vs_model"] > 0
    assert "| classify |" in pipeline_markdown(p) and "pure model time" in pipeline_markdown(p)
    t = bench_training(size=32, batch=2, steps=1)
    assert t["stage1_images_per_s"] > 0 and t["stage2_images_per_s"] > 0
    assert "fine-tuning" in training_markdown(t)
