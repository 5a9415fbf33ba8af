"""Synthetic data -> train (tiny) -> convert -> device pipeline -> dashboard over HTTP.

Slow: it really trains and converts an EfficientNetB3 (at 64 px, two epochs),
so the model is not expected to be good; what is checked is that every
contract between the stages holds.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import urllib.request

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.tf]
tf = pytest.importorskip("tensorflow")


def test_training_writes_a_reproducible_run_folder(tiny_run):
    root, _, metrics = tiny_run
    run = root / "run"
    info = json.loads((run / "training.json").read_text())
    assert (run / "model.keras").is_file() and (run / "training_curves.png").is_file()
    assert metrics["synthetic_data"] is True
    assert info["data"]["split_by"] == "subject"
    splits = {k: set(v) for k, v in info["splits"].items()}
    assert not (splits["train"] & splits["test"]) and not (splits["train"] & splits["val"]), (
        "a subject leaked across splits"
    )
    assert info["preprocess"]["input_size"] == 64
    # The training images' scale is recorded: 96 px synthetic cells at 0.211 µm/px span 20.25 µm.
    assert info["data_um_per_px"] == pytest.approx(450 * 0.045 / 96)
    assert info["preprocess"]["crop_um"] == pytest.approx(20.25, abs=0.01)
    for key in ("accuracy", "sensitivity", "specificity", "ppv", "npv"):
        m = metrics["test"][key]
        if m["n"]:
            assert m["ci95"][0] <= m["value"] <= m["ci95"][1]
        else:  # e.g. PPV when nothing was called positive: undefined, not NaN
            assert m["value"] is None and m["ci95"] is None
    assert metrics["test"]["accuracy"]["n"] == metrics["test"]["n"] > 0


def test_reference_gradcam_equals_head_cam_up_to_scale(tiny_run):
    import keras

    from training.gradcam import grad_cam, head_cam

    root, _, _ = tiny_run
    model = keras.models.load_model(root / "run" / "model.keras", compile=False)
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3)).astype(np.uint8)
    cam, _ = head_cam(model, images)
    hw = cam.shape[1] * cam.shape[2]
    np.testing.assert_allclose(grad_cam(model, images, positive=True), np.maximum(cam, 0) / hw, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(grad_cam(model, images, positive=False), np.maximum(-cam, 0) / hw, rtol=1e-3, atol=1e-6)


def test_convert_device_pipeline_and_dashboard(tiny_run, tmp_path):
    from waitress import create_server

    from convert.cli import run_convert
    from convert.verify import Gate
    from device.bundle import load_bundle, sha256_file
    from device.config import (
        CameraConfig,
        Config,
        FinderConfig,
        ModelConfig,
        ServiceConfig,
        StoreConfig,
    )
    from device.service import Appliance
    from device.web import create_app
    from training.synth import write_fields

    root, data, _ = tiny_run
    bundle_dir = tmp_path / "bundle"
    # A two-epoch model is not expected to survive int8 well; this test is about the contracts, so the gate is open.
    verification = run_convert(
        root / "run" / "model.keras",
        data,
        bundle_dir,
        calibration=32,
        gate=Gate(min_agreement=0.0, max_delta_sensitivity=1.0, min_cam_correlation=-1.0),
    )
    bundle = load_bundle(bundle_dir)
    assert sha256_file(bundle_dir / "model.tflite") == bundle.meta["tflite_sha256"]
    assert bundle.meta["quantization"]["mode"] == "int8" and bundle.synthetic
    assert verification["n"] > 0 and verification["mean_abs_dprob"] < 0.2
    assert verification["cam_pairs"] > 0 and verification["cam_correlation_mean"] > 0.5
    # The scale travels from training through convert to the device's contract.
    assert bundle.contract.crop_um == pytest.approx(20.25, abs=0.01)
    # The mode was chosen on validation; the test split was measured once, on the chosen bundle.
    assert bundle.meta["verification"]["split"] == "validation"
    assert bundle.meta["metrics"]["split"] == "test" and bundle.meta["metrics"]["quantized"]["n"] > 0
    # The whole field path was run beside the training path and recorded.
    parity = bundle.meta["field_parity"]
    assert parity["cells"] > 0 and parity["found"] >= 0.9 * parity["cells"]
    assert {"training_path", "field_path", "p_value", "passed"} <= set(parity)

    fields = tmp_path / "fields"
    write_fields(fields, n=2, width=640, height=480, um_per_px=0.1, seed=3)
    cfg = Config(
        camera=CameraConfig(replay_dir=str(fields)),
        model=ModelConfig(bundle=str(bundle_dir), threads=1),
        store=StoreConfig(data_dir=str(tmp_path / "store"), min_free_mb=1),
        service=ServiceConfig(startup_captures=0),
        finder=FinderConfig(um_per_px=0.1),
    )
    cfg = dataclasses.replace(cfg, web=dataclasses.replace(cfg.web, port=0))
    with Appliance(cfg) as app:
        assert app.self_test.passed
        outcome = app.capture_now("test")
        assert outcome.capture_id is not None
        server = create_server(create_app(app), host="127.0.0.1", port=0, threads=2)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            base = f"http://127.0.0.1:{server.effective_port}"
            with urllib.request.urlopen(f"{base}/api/captures/{outcome.capture_id}", timeout=10) as r:
                cap = json.load(r)
            assert cap["n_cells"] >= 1 and cap["model_sha256"] == bundle.sha256
            with urllib.request.urlopen(base + cap["cells"][0]["heatmap_url"], timeout=10) as r:
                assert r.headers["Content-Type"] == "image/jpeg" and len(r.read()) > 100
            with urllib.request.urlopen(base + "/", timeout=10) as r:
                assert f"Capture {outcome.capture_id}" in r.read().decode()
        finally:
            server.close()
            thread.join(10)
