"""`leukocam convert` / `verify`: the fidelity gate really gates, other modes load on the device.

The conversion is `convert.build` (a result and domain errors); `convert.cli` only parses and prints;
training never imports convert.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from device.bundle import load_bundle
from device.classifier import Classifier
from device.imaging import atomic_write_bytes, encode_image
from tests.conftest import REPO

needs_tf = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="needs TensorFlow (the train extra)"
)


def slow_tf(test):
    """Trains, converts or benchmarks a model: needs TensorFlow."""
    return pytest.mark.slow(pytest.mark.tf(needs_tf(test)))


OPEN_GATE = dict(min_agreement=0.0, max_delta_sensitivity=1.0, min_cam_correlation=-1.0)


@slow_tf
def test_gate_fails_on_blank_calibration_and_writes_nothing(small_run, tmp_path):
    from convert.build import ConvertOptions, convert_bundle
    from convert.errors import GateFailedError
    from convert.verify import Gate

    root, data, metrics = small_run
    assert metrics["test"]["accuracy"]["value"] >= 0.7, "the gate test needs a model that discriminates"
    # Calibrated properly, the same model passes the default gate: the failure below is the calibration's.
    good = convert_bundle(root / "run" / "model.keras", data, tmp_path / "good", ConvertOptions(calibration=64))
    assert good.verification["label_agreement"] >= 0.99 and not good.forced
    blank = tmp_path / "blank"
    for i in range(40):
        atomic_write_bytes(blank / f"blank_{i:02d}.png", encode_image(np.zeros((64, 64, 3), np.uint8), "PNG"))
    out = tmp_path / "bundle"
    lines = []
    with pytest.raises(GateFailedError, match="fails the fidelity gate") as err:
        convert_bundle(
            root / "run" / "model.keras",
            data,
            out,
            ConvertOptions(
                calibration=0,
                extra_calibration=blank,
                gate=Gate(min_agreement=0.99, max_delta_sensitivity=0.01, min_cam_correlation=0.9),
            ),
            progress=lambda message, warning=False: lines.append(message),
        )
    assert err.value.failures and err.value.verification["label_agreement"] < 0.99
    assert any("gate: FAIL" in line for line in lines), "progress goes to the callback, not the terminal"
    assert not out.exists(), "a failed gate must not leave a bundle"
    assert not list(tmp_path.glob(".bundle.*")), "nor a half-written temp folder"


@slow_tf
def test_convert_records_verification_and_verify_reproduces_it(tiny_run, tmp_path):
    from convert.build import ConvertOptions, convert_bundle, verify_bundle
    from convert.verify import Gate

    root, data, _ = tiny_run
    model = root / "run" / "model.keras"
    out = tmp_path / "bundle"
    result = convert_bundle(model, data, out, ConvertOptions(calibration=48, gate=Gate(**OPEN_GATE)))
    v = result.verification
    meta = json.loads((out / "model.json").read_text())
    assert meta["gate"]["passed"] and meta["quantization"]["mode"] == "int8"
    assert meta["quantization"]["input_type"] == "uint8"
    assert meta["verification"]["label_agreement"] == pytest.approx(v["label_agreement"])
    for key in (
        "delta_sensitivity",
        "delta_specificity",
        "delta_auc",
        "mean_abs_dprob",
        "max_abs_dprob",
        "cam_correlation_mean",
    ):
        assert key in meta["verification"]
    # The result carries model.json as written, typed; it round-trips to the file.
    assert result.meta == load_bundle(out).info and result.meta.to_dict() == meta
    assert result.mode == "int8" and result.meta.gate_passed and result.bundle_dir == out.resolve()
    assert meta["preprocess"]["crop_um"] == pytest.approx(20.25, abs=0.01), "the run's scale reaches the bundle"
    assert meta["training"]["options"]["input_size"] == 64 and meta["synthetic"] is True
    again = verify_bundle(out, model, data, Gate(**OPEN_GATE))
    assert again.passed
    assert again.verification["label_agreement"] == pytest.approx(v["label_agreement"])
    assert again.verification["mean_abs_dprob"] == pytest.approx(v["mean_abs_dprob"], abs=1e-6)
    # An impossible gate makes `leukocam verify` exit non-zero with a readable report.
    from device.cli import cli

    result = CliRunner().invoke(
        cli, ["verify", str(out), "--model", str(model), "--data", str(data), "--min-cam-correlation", "1.01"]
    )
    assert result.exit_code == 1 and "gate: FAIL" in result.output and "CAM correlation" in result.output
    assert "fewer than 1000" in result.output, "a gate on a few dozen crops says it measures noise"
    assert meta["verification"]["gate_crops"] == v["n"] and meta["verification"]["gate_crops_enough"] is False


@slow_tf
@pytest.mark.parametrize("mode,float_layers", [("float16", 0), ("int8", 3), ("dynamic", 0)])
def test_fallback_modes_run_on_the_device(tiny_run, tmp_path, mode, float_layers):
    from convert.cli import run_convert
    from convert.verify import Gate

    root, data, _ = tiny_run
    out = tmp_path / "bundle"
    v = run_convert(
        root / "run" / "model.keras",
        data,
        out,
        mode=mode,
        float_layers=float_layers,
        calibration=32,
        gate=Gate(**OPEN_GATE),
    )
    bundle = load_bundle(out)
    assert bundle.info.quantization.mode == mode
    assert len(bundle.info.quantization.float_layers) == float_layers
    if float_layers:
        assert bundle.info.quantization.worst_layers[0]["rmse_per_scale"] > 0
    with Classifier(bundle, threads=1) as clf:
        assert clf.self_test().passed
        preds = clf.classify(bundle.golden.crops)
    assert len(preds) == len(bundle.golden.crops) and {p.label for p in preds} <= set(bundle.labels)
    assert all(0.0 <= p.probability <= 1.0 and p.cam.shape == bundle.info.cam.shape for p in preds)
    assert bundle.info.quantization.input_type == ("uint8" if mode == "int8" and not float_layers else "float32")
    assert bundle.info.quantization.latency["ms_per_crop"] > 0, "every converted mode is timed"
    if mode == "float16":
        assert v["max_abs_dprob"] < 0.01  # float16 weights barely move the outputs
    if mode == "dynamic":  # int8 weights, float activations: about the int8 file, far closer to float
        assert bundle.info.tflite_bytes < 16e6, "B3's weights in int8: ~12.5 MB (float16 ~21 MB, float32 ~43 MB)"
        assert v["max_abs_dprob"] < 0.05


@slow_tf
def test_auto_ladder_times_and_gates_every_mode_it_tries(small_run, tmp_path):
    from convert.build import AUTO_SEQUENCE, mode_label
    from convert.report import REPORT_FILE
    from device.cli import cli

    root, data, _ = small_run
    out = tmp_path / "bundle"
    # A gate no mode can pass, forced: every rung is converted, timed and measured, and the last one is written.
    args = ["convert", str(root / "run" / "model.keras"), "--data", str(data), "--out", str(out), "--quant", "auto"]
    args += ["--calibration", "32", "--min-cam-correlation", "1.01", "--force", "--parity-fields", "0"]
    args += ["--qat-epochs", "1", "--qat-crops", "32", "--qat-clip", "0.9995"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "model.json").read_text())
    q = meta["quantization"]
    ladder = [mode_label(m, n) for m, n in AUTO_SEQUENCE]
    assert q["ladder"] == ladder
    assert ladder == ["int8", "int8 quantization-aware", "int8 with 10 float layers", "dynamic", "float16", "int16x8"]
    assert [a["mode"] for a in q["attempts"]] == ladder and q["mode"] == "int16x8"
    # This small CNN has fewer quantized tensors than the 10 the selective rung keeps in float: that rung is
    # skipped, and says why; every other rung is converted, timed and measured.
    assert "nothing in int8" in q["attempts"][2]["skipped"] and q["attempts"][2]["failures"]
    tuned = q["attempts"][1]
    assert tuned["quant"] == "int8" and tuned["fine_tuning"]["crops"] == 32 and tuned["fine_tuning"]["epochs"] == 1
    assert tuned["fine_tuning"]["clip_quantile"] == 0.9995 and tuned["fine_tuning"]["clipped_tensors"] == 0
    assert "fine_tuning" not in q, "the shipped int16x8 model is not the fine-tuned one"
    for a in q["attempts"][:2] + q["attempts"][3:]:
        assert a["latency_ms"] > 0 and a["bytes"] > 0 and a["passed"] is False and a["failures"]
        for key in ("label_agreement", "delta_sensitivity", "delta_specificity", "cam_correlation_mean", "flips"):
            assert key in a, key
        assert {c["label"] for c in a["per_class"].values()} == set(meta["labels"])
    assert [a.get("chosen", False) for a in q["attempts"]] == [False] * 5 + [True]
    lat = q["latency"]
    assert lat["ms_per_crop"] == q["attempts"][-1]["latency_ms"] and lat["threads"] == 2 and lat["batch"] == 1
    assert lat["int8_ms_per_crop"] == q["attempts"][0]["latency_ms"]
    assert lat["vs_int8"] == pytest.approx(lat["ms_per_crop"] / lat["int8_ms_per_crop"])
    assert isinstance(lat["order_agrees"], bool) and (lat["order_note"] is None) == lat["order_agrees"]
    # The validation split of this small run is far below 1,000 crops: said, not failed.
    v, gate = meta["verification"], meta["gate"]
    assert v["gate_crops"] == v["n"] < 1000 and v["gate_crops_enough"] is False and gate["min_crops"] == 1000
    assert any("fewer than 1000" in w for w in gate["warnings"]) and gate["forced"]
    assert "fewer than 1000" in result.output
    assert set(v["per_class"]) == {"positive", "negative"} and set(gate["per_class"]) == set(meta["labels"])
    assert v["flips_total"] == len(v["flips"]) or len(v["flips"]) == 50
    report = (out / REPORT_FILE).read_text()
    assert "## Quantization ladder" in report and "### Per class" in report and "### Flips" in report
    for label in ladder:
        assert f"| {label} |" in report
    assert "(shipped, forced)" in report and "too few" in report
    assert "int8 quantization-aware: a copy of the model fine-tuned for int8" in report
    assert load_bundle(out).info.quantization.label == "int16x8"


def test_gate_reports_per_class_flips_and_too_few_crops(demo_bundle_dir):
    """compare, Gate and the convert report on made-up outputs: no TensorFlow needed."""
    from convert.report import convert_report
    from convert.verify import Gate, compare
    from device.bundle_meta import BundleMeta

    labels = np.array([1] * 40 + [0] * 60)
    pf = np.where(labels == 1, 0.9, 0.1).astype(np.float32)
    pq = pf.copy()
    pq[[3, 5]] = 0.4  # two blasts lost
    pq[50] = 0.7  # one normal called blast
    cams = np.random.default_rng(0).normal(size=(100, 3, 3)).astype(np.float32)
    names = [f"cells/{i:03d}.png" for i in range(100)]
    v = compare(
        {"probability": pf, "cam": cams},
        {"probability": pq, "cam": cams},
        labels,
        0.5,
        names=names,
        label_names=("normal", "blast"),
    )
    assert v["flips_total"] == 3 and [f["index"] for f in v["flips"]] == [3, 5, 50]
    assert v["flips"][0] == {
        "index": 3,
        "file": "cells/003.png",
        "label": "blast",
        "float_probability": pytest.approx(0.9),
        "quantized_probability": pytest.approx(0.4),
        "float_label": "blast",
        "quantized_label": "normal",
    }
    pos, neg = v["per_class"]["positive"], v["per_class"]["negative"]
    assert pos["label"] == "blast" and pos["n"] == 40 and pos["flips"] == 2 and pos["metric"] == "sensitivity"
    assert pos["label_agreement"] == pytest.approx(38 / 40) and pos["delta"] == pytest.approx(-2 / 40)
    assert neg["n"] == 60 and neg["flips"] == 1 and neg["delta"] == pytest.approx(-1 / 60)
    assert v["delta_sensitivity"] == pytest.approx(pos["delta"])
    gate = Gate()
    assert gate.failures(v) and "label agreement 0.970 < 0.99" in gate.failures(v)[0]
    per_class = gate.class_failures(v)
    assert per_class["blast"] and any("sensitivity" in p for p in per_class["blast"])
    assert any("specificity" in p for p in per_class["normal"])
    (warning,) = gate.warnings(v)
    assert "only 100 held-out crops" in warning and "2.50 points of sensitivity" in warning
    assert Gate(min_crops=100).warnings(v) == []
    # The report of a bundle with that verification lists the flips and the gate per class.
    meta = BundleMeta.from_dict(json.loads((demo_bundle_dir / "model.json").read_text()))
    meta = dataclasses.replace(
        meta,
        verification={**v, "split": "validation", "gate_crops": 100, "gate_crops_enough": False},
        gate={
            **gate.to_dict(),
            "passed": False,
            "failures": gate.failures(v),
            "warnings": [warning],
            "per_class": per_class,
        },
    )
    text = convert_report(meta, v["flips"])
    assert "### Flips: 3 crop(s) changed label" in text
    assert "| 3 | cells/003.png | blast | 0.9000 | 0.4000 | blast → normal |" in text
    assert "| blast | 40 | 0.9500 | sensitivity | 1.000 | 0.950 | -0.050 |" in text
    assert "outside: " in text and "**too few** (warning)" in text and "only 100 held-out crops" in text
    assert "one blast crop is 2.50 points of sensitivity" in text
    # The demo bundle's recorded ladder (before timing): its fallbacks are named, nothing is invented.
    assert "## Quantization ladder" in text and "Fallback: int8 was not kept" in text


@slow_tf
def test_model_benchmark_runs_and_reports_ratios(tmp_path):
    from convert.bench import bench_models, to_markdown, write_results

    ladder = ("int8", "dynamic", "float32")  # int8 and float32 come from the grid: one more conversion
    result = bench_models(
        size=32, modes=("int8", "float32"), batches=(1, 2), threads=(1, 2), repeats=1, calibration=2, ladder=ladder
    )
    models = {r["model"] for r in result["rows"]}
    assert models == {"keras float32", "tflite int8", "tflite float32"}
    rows = {r["mode"]: r for r in result["ladder"]}
    assert tuple(rows) == ladder and all(r["ms_per_crop"] > 0 for r in rows.values())
    assert rows["int8"]["vs_int8"] == 1.0 and rows["int8"]["input"] == "uint8" and rows["dynamic"]["input"] == "float32"
    sizes = {r["model"]: r["size_mb"] for r in result["rows"] if r["size_mb"]}
    assert sizes["tflite int8"] < sizes["tflite float32"] / 2  # int8 weights are a quarter of float32
    for r in result["rows"]:
        assert r["ms"] > 0 and r["vs_keras"] > 0
    result["markdown"] = to_markdown(result)
    path = write_results([result], tmp_path)
    assert "tflite int8" in path.read_text() and json.loads(path.with_suffix(".json").read_text())[0]["cpu"]
    assert "### Quantization ladder at 32 px" in path.read_text() and "| dynamic | float32 |" in path.read_text()


@slow_tf
def test_finder_benchmark_reports_the_ratio_and_the_stress_table():
    from convert.bench import bench_finder, finder_markdown

    stress = Path(__file__).parent / "data" / "stress"
    r = bench_finder(model_ms_5=10.0, width=640, height=480, cells=2, repeats=1, corpus=stress)
    assert r["found_cells"] == r["true_cells"] == 2
    assert r["find_ms"] > 0 and r["find_vs_model"] == r["find_ms"] / 10.0
    assert {row["condition"] for row in r["stress"]} >= {"bccd-mgg", "synth-blast-dense"}
    md = finder_markdown(r)
    assert "finder / model" in md and "| bccd-mgg |" in md


@slow_tf
def test_pipeline_and_training_benchmarks_run(demo_bundle_dir):
    from convert.bench import bench_pipeline, bench_training, pipeline_markdown, training_markdown

    p = bench_pipeline(demo_bundle_dir, width=1280, height=960, cells=2, captures=1)
    assert p["found_cells"] == p["true_cells"] == 2
    for stage in ("capture", "qc", "find", "crop", "classify", "cells", "store", "total"):
        assert p["median_ms"][stage] >= 0
    assert 0 < p["model_share"] <= 1.5 and p["peak_rss_mb"] > 50
    assert p["after_frame_ms"] > 0 and p["after_frame_vs_model"] > 0
    assert "| classify |" in pipeline_markdown(p) and "pure model time" in pipeline_markdown(p)
    t = bench_training(size=32, batch=2, steps=1)
    assert t["stage1_images_per_s"] > 0 and t["stage2_images_per_s"] > 0
    assert "fine-tuning" in training_markdown(t)


# -- structure: no TensorFlow needed -------------------------------------------------------------
def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(str(node.args[0].value))
    return names


def test_training_never_imports_convert():
    """convert imports training (the dataset readers, the parity check); never the other way round."""
    files = sorted((REPO / "training").rglob("*.py"))
    assert files
    offending = {
        str(p.relative_to(REPO)): sorted(m for m in _imported_modules(p) if m.split(".")[0] == "convert") for p in files
    }
    assert not {k: v for k, v in offending.items() if v}


def test_training_json_is_read_typed_and_checked(tmp_path):
    from convert.errors import ConvertError
    from convert.run_info import read_run_info

    model = tmp_path / "run" / "model.keras"
    with pytest.raises(ConvertError, match="training.json not found: convert needs the run folder"):
        read_run_info(model)
    model.parent.mkdir()
    info = {
        "labels": ["normal", "blast"],
        "preprocess": {"input_size": 64, "crop_um": 20.25},
        "threshold": 0.4,
        "review_band": [0.2, 0.6],
        "data": {"images": 10},
        "options": {"epochs": 2},
        "data_um_per_px": 0.21,
        "feature_layer": "top_activation",
        "split_files": {"train": ["a.png"], "val": ["b.png"]},
    }
    (model.parent / "training.json").write_text(json.dumps(info))
    run = read_run_info(model)
    assert run.labels == ("normal", "blast") and run.contract.crop_um == 20.25 and run.threshold == 0.4
    assert run.split_files.of("train") == ("a.png",) and run.split_files.test == () and run.run_dir == model.parent
    assert run.synthetic is False and run.test_metrics is None, "metrics.json is optional"
    (model.parent / "metrics.json").write_text(json.dumps({"synthetic_data": True, "test": {"n": 3}}))
    assert read_run_info(model).synthetic and read_run_info(model).test_metrics == {"n": 3}
    for key, value, named in (
        ("threshold", "high", "threshold"),
        ("labels", ["x"], "labels"),
        ("split_files", {"val": "b.png"}, "split_files.val"),
        ("preprocess", {"input_size": 4}, "preprocess"),
    ):
        (model.parent / "training.json").write_text(json.dumps({**info, key: value}))
        with pytest.raises(ConvertError, match=named):
            read_run_info(model)
    (model.parent / "training.json").write_text(json.dumps({k: v for k, v in info.items() if k != "options"}))
    with pytest.raises(ConvertError, match="missing fields options"):
        read_run_info(model)


def test_convert_cli_reports_a_run_folder_it_cannot_read(tmp_path):
    from device.cli import cli

    model = tmp_path / "model.keras"
    model.write_bytes(b"not a model")
    result = CliRunner().invoke(cli, ["convert", str(model), "--data", str(tmp_path), "--out", str(tmp_path / "b")])
    assert result.exit_code == 1, result.output
    assert "training.json not found" in result.output and "Traceback" not in result.output


def test_demo_model_is_registered_from_the_convert_side():
    from convert.demo import demo_model
    from device.cli import LAZY_COMMANDS, cli

    assert LAZY_COMMANDS["demo-model"][0] == "convert.demo:demo_model"
    result = CliRunner().invoke(cli, ["demo-model", "--help"])
    assert result.exit_code == 0 and "SYNTHETIC demo bundle" in result.output
    assert demo_model.name == "demo-model"
