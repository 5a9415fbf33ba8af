"""The model bundle contract: the shipped bundle is valid; damaged or foreign bundles are refused clearly."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import shutil

import numpy as np
import pytest

from device.bundle import SCHEMA_VERSION, load_bundle, sha256_file
from device.bundle_meta import BundleMeta
from device.classifier import Classifier
from device.errors import BundleError


@pytest.fixture
def bundle_copy(tmp_path, demo_bundle_dir):
    dst = tmp_path / "bundle"
    shutil.copytree(demo_bundle_dir, dst)
    return dst


def test_shipped_bundle_hash_matches_model_json(demo_bundle_dir):
    meta = json.loads((demo_bundle_dir / "model.json").read_text())
    assert sha256_file(demo_bundle_dir / "model.tflite") == meta["tflite_sha256"]
    assert meta["schema_version"] == SCHEMA_VERSION
    assert meta["synthetic"] is True, "the demo bundle must say it was trained on synthetic data"
    assert (demo_bundle_dir / "model.tflite").stat().st_size <= 15_000_000


def test_shipped_bundle_passes_self_test(demo_bundle_dir):
    bundle = load_bundle(demo_bundle_dir)
    with Classifier(bundle, threads=1) as clf:
        result = clf.self_test()
    assert result.passed, result.message
    assert result.count >= 4


def test_tampered_tflite_is_refused(bundle_copy):
    data = bytearray((bundle_copy / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle_copy / "model.tflite").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 .* does not match"):
        load_bundle(bundle_copy)


def test_wrong_schema_is_refused(bundle_copy):
    meta = json.loads((bundle_copy / "model.json").read_text())
    meta["schema_version"] = SCHEMA_VERSION + 1
    (bundle_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="schema_version"):
        load_bundle(bundle_copy)


def test_missing_files_are_named(bundle_copy, tmp_path):
    (bundle_copy / "golden.npz").unlink()
    with pytest.raises(BundleError, match="golden"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nowhere")
    (bundle_copy / "model.json").write_text("{not json")
    with pytest.raises(BundleError, match="not JSON"):
        load_bundle(bundle_copy)


def test_tampered_golden_is_refused(bundle_copy):
    with np.load(bundle_copy / "golden.npz") as npz:
        arrays = dict(npz)
    arrays["probabilities"] = 1.0 - arrays["probabilities"]
    np.savez_compressed(bundle_copy / "golden.npz", **arrays)
    with pytest.raises(BundleError, match="golden.npz: sha256"):
        load_bundle(bundle_copy)


def test_shape_mismatch_is_refused(bundle_copy):
    meta = json.loads((bundle_copy / "model.json").read_text())
    meta["cam"]["shape"] = [7, 7]
    (bundle_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="CAM output"):
        Classifier(load_bundle(bundle_copy), threads=1)


def test_missing_output_is_refused(bundle_copy):
    meta = json.loads((bundle_copy / "model.json").read_text())
    meta["outputs"]["cam"] = "no_such_output"
    (bundle_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="no_such_output"):
        Classifier(load_bundle(bundle_copy), threads=1)


# -- model.json, typed (device.bundle_meta) ------------------------------------------------------
def test_shipped_model_json_round_trips_unchanged(demo_bundle_dir):
    text = (demo_bundle_dir / "model.json").read_text()
    meta = json.loads(text)
    info = BundleMeta.from_dict(meta, demo_bundle_dir / "model.json")
    assert info.to_dict() == meta
    assert json.dumps(info.to_dict(), indent=2, sort_keys=True) == text, "to_dict must write the same file"
    assert BundleMeta.from_dict(info.to_dict()) == info


def test_loaded_bundle_is_typed(demo_bundle_dir):
    bundle = load_bundle(demo_bundle_dir)
    info = bundle.info
    assert bundle.meta == info.to_dict(), "Bundle.meta stays the model.json dict for older readers"
    assert info.labels == bundle.labels == ("normal", "blast") and info.positive_label == "blast"
    assert info.input_size == bundle.contract.input_size == 96
    assert info.outputs.by_role() == {"probability": "probability", "logit": "logit", "cam": "cam"}
    assert info.cam.shape == (3, 3) and info.golden.tolerance == bundle.golden.tolerance
    assert info.quantization.mode == "int8" and info.quantization.float_layers == ()
    assert info.quantization.attempts[-1]["passed"] and info.gate_passed is True
    assert info.synthetic is bundle.synthetic is True and info.name == "leukocam-demo-synthetic"
    # The test split's numbers when convert measured it; the headline values are the point estimates.
    assert info.quantized_metrics == bundle.meta["metrics"]["quantized"]
    assert info.headline_metrics()["accuracy"] == bundle.meta["metrics"]["quantized"]["accuracy"]["value"]
    assert info.headline_metrics()["auc"] == bundle.meta["metrics"]["quantized"]["auc"]


def test_the_quantization_ladder_is_typed_and_round_trips(demo_bundle_dir):
    meta = json.loads((demo_bundle_dir / "model.json").read_text())
    q = BundleMeta.from_dict(meta).quantization
    # The demo bundle climbed the timed ladder: every rung named, its own cost against int8 measured. Plain int8
    # failed the gate and int8 after quantization-aware fine-tuning shipped (docs/demo.md).
    assert q.ladder == (
        "int8",
        "int8 quantization-aware",
        "int8 with 10 float layers",
        "dynamic",
        "float16",
        "int16x8",
    )
    assert q.label == "int8 quantization-aware" and q.mode == "int8"
    assert q.speed_vs_int8 == pytest.approx(meta["quantization"]["latency"]["vs_int8"])
    assert [mode for mode, _ in q.fallbacks()] == [a["mode"] for a in meta["quantization"]["attempts"][:-1]]
    # A bundle from before the timed ladder: no ladder, no latency; its fallbacks are still named.
    old = json.loads(json.dumps(meta))
    del old["quantization"]["ladder"], old["quantization"]["latency"]
    q = BundleMeta.from_dict(old).quantization
    assert q.ladder is None and q.latency is None and q.speed_vs_int8 is None
    assert q.label == "int8 quantization-aware"
    assert [mode for mode, _ in q.fallbacks()] == [a["mode"] for a in meta["quantization"]["attempts"][:-1]]
    meta["quantization"].update(
        ladder=["int8", "int8 with 10 float layers", "dynamic", "float16", "int16x8"],
        attempts=[
            {"mode": "int8", "passed": False, "failures": ["label agreement 0.98 < 0.99"], "latency_ms": 10.0},
            {"mode": "int8 with 10 float layers", "passed": True, "failures": [], "latency_ms": 12.0, "chosen": True},
        ],
        mode="int8",
        float_layers=["a", "b"],
        latency={"ms_per_crop": 12.0, "int8_ms_per_crop": 10.0, "vs_int8": 1.2, "threads": 2},
    )
    info = BundleMeta.from_dict(meta)
    assert info.to_dict() == meta, "the new keys are written back as read"
    q = info.quantization
    assert q.label == "int8 with 10 float layers", "the chosen attempt names the mode, not the float-layer count"
    assert q.speed_vs_int8 == 1.2 and q.fallbacks() == [("int8", ["label agreement 0.98 < 0.99"])]


def test_quantized_metrics_fall_back_to_the_verification(demo_bundle_dir):
    meta = json.loads((demo_bundle_dir / "model.json").read_text())
    del meta["metrics"]  # bundles from before convert measured the test split
    info = BundleMeta.from_dict(meta)
    assert info.metrics is None and "metrics" not in info.to_dict()
    assert info.quantized_metrics == meta["verification"]["quantized_metrics"]
    assert info.float_metrics == meta["verification"]["float_metrics"]
    del meta["verification"]
    assert BundleMeta.from_dict(meta).quantized_metrics == {} and BundleMeta.from_dict(meta).headline_metrics() == {}


def test_unknown_and_null_fields_survive_the_round_trip(demo_bundle_dir):
    meta = json.loads((demo_bundle_dir / "model.json").read_text())
    meta["future_field"] = {"x": 1}
    meta["cam"]["colormap"] = "jet"
    meta["field_parity"] = None
    meta["preprocess"]["crop_um"] = None
    del meta["name"]
    info = BundleMeta.from_dict(meta)
    assert info.to_dict() == meta
    assert info.extra == {"future_field": {"x": 1}} and info.cam.extra == {"colormap": "jet"} and info.name == ""


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda m: m["cam"].update(shape=[3]), "cam.shape"),
        (lambda m: m["outputs"].pop("logit"), "outputs.logit"),
        (lambda m: m["golden"].update(tolerance=-1), "golden.tolerance"),
        (lambda m: m["quantization"].pop("mode"), "quantization.mode"),
        (lambda m: m["quantization"].update(float_layers="conv"), "quantization.float_layers"),
        (lambda m: m["quantization"].update(ladder="int8,dynamic"), "quantization.ladder"),
        (lambda m: m["quantization"].update(latency=[12.0]), "quantization.latency"),
        (lambda m: m.update(tflite_sha256="abc"), "tflite_sha256"),
        (lambda m: m.update(synthetic="yes"), "synthetic"),
        (lambda m: m.update(signature=""), "signature"),
        (lambda m: m.update(threshold="0.5"), "threshold"),
        (lambda m: m.update(review_band=[0.3]), "review_band"),
        (lambda m: m.update(labels=["normal"]), "labels"),
        (lambda m: m.update(outputs=["probability"]), "outputs"),
        (lambda m: m["preprocess"].update(interpolation="nearest"), "preprocess"),
        (lambda m: m.update(input_size=128), "input_size"),
        (lambda m: m.update(metrics=[1]), "metrics"),
        # issue #12: each of these once got past start-up or ended in a traceback
        (lambda m: m.update(threshold=None), "threshold must be a number in 0..1"),
        (lambda m: m.update(threshold=[0.1, 0.5, 0.9]), "threshold must be a number in 0..1"),
        (lambda m: m.update(threshold=1.5), "threshold must be a number in 0..1"),
        (lambda m: m.update(threshold=float("nan")), "threshold must be a number in 0..1"),
        (lambda m: m.update(review_band="0.3,0.7"), "review_band must be [low, high]"),
        (lambda m: m.update(review_band=None), "review_band must be [low, high]"),
        (lambda m: m.update(review_band=[0.1, 0.5, 0.9]), "review_band must be [low, high]"),
        (lambda m: m.update(review_band=[0.7, 0.3]), "low <= high"),
        (lambda m: m.update(review_band=[0.3, float("inf")]), "review_band must be [low, high]"),
        (
            lambda m: m.update(threshold=0.5, review_band=[0.6, 0.9]),
            "review_band [0.6, 0.9] must contain threshold 0.5",
        ),
        (lambda m: m.update(golden=[1, 2]), "golden must be a JSON object"),
        (lambda m: m["golden"].update(tolerance=float("nan")), "golden.tolerance"),
        (lambda m: m.update(quantization="int8"), "quantization must be a JSON object"),
    ],
)
def test_bad_fields_are_named(demo_bundle_dir, edit, field):
    meta = json.loads((demo_bundle_dir / "model.json").read_text())
    edit(meta)
    with pytest.raises(BundleError, match=re.escape(field)) as err:
        BundleMeta.from_dict(meta, "bundle/model.json")
    assert str(err.value).startswith("bundle/model.json: ")


def _replace_golden(bundle_dir, data: bytes) -> None:
    """Write golden.npz and record its sha256 in model.json as convert does, so the file's own checks run."""
    (bundle_dir / "golden.npz").write_bytes(data)
    meta = json.loads((bundle_dir / "model.json").read_text())
    meta["golden"]["sha256"] = hashlib.sha256(data).hexdigest()
    (bundle_dir / "model.json").write_text(json.dumps(meta))


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda good: good[: len(good) // 2], "not a .npz archive"),
        (lambda good: b"garbage" * 100, "not a .npz archive"),
        (lambda good: _npz_bytes(crops=np.zeros((1, 96, 96, 3), np.uint8)), "unreadable golden file"),
        (lambda good: _npz_bytes(crops=np.array([None]), probabilities=np.zeros(1), cams=np.zeros(1)), "unreadable"),
        (
            lambda good: _npz_bytes(crops=np.zeros((2, 96, 96, 3), np.uint8), probabilities=np.zeros(3), cams=[0]),
            "golden probabilities have shape (3,)",
        ),
        (
            lambda good: _npz_bytes(crops=np.zeros((1, 96, 96, 3), np.uint8), probabilities=[np.nan], cams=[0]),
            "expected 1 finite floats",
        ),
    ],
    ids=["truncated", "garbage", "no-probabilities", "pickled", "wrong-length", "nan"],
)
def test_corrupt_golden_is_a_bundle_error(bundle_copy, make, message):
    _replace_golden(bundle_copy, make((bundle_copy / "golden.npz").read_bytes()))
    with pytest.raises(BundleError, match=re.escape(message)) as err:
        load_bundle(bundle_copy)
    assert str(err.value).startswith(f"{bundle_copy / 'golden.npz'}: ")


def test_damaged_golden_is_reported_as_altered_when_its_hash_differs(bundle_copy):
    data = (bundle_copy / "golden.npz").read_bytes()
    (bundle_copy / "golden.npz").write_bytes(data[:100])
    with pytest.raises(BundleError, match="golden.npz: sha256 does not match model.json"):
        load_bundle(bundle_copy)


def test_precheck_refuses_a_bad_folder_and_leaves_a_store_to_roll_back(bundle_copy, tmp_path):
    from device.bundle_store import precheck_bundle

    precheck_bundle(bundle_copy)  # the good copy
    meta = json.loads((bundle_copy / "model.json").read_text())
    meta["threshold"] = "0.5"
    (bundle_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="threshold must be a number"):
        precheck_bundle(bundle_copy)
    store = tmp_path / "store"
    (store / "bundles").mkdir(parents=True)
    precheck_bundle(store)  # a store: resolve_active_bundle decides (it may roll back to `previous`)


def test_bad_field_stops_load_bundle(bundle_copy):
    meta = json.loads((bundle_copy / "model.json").read_text())
    meta["cam"]["shape"] = "3x3"
    (bundle_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"cam\.shape must be \[height, width\].*re-run `leukocam convert`"):
        load_bundle(bundle_copy)


def test_writer_stamps_and_checks_model_json(demo_bundle_dir, tmp_path):
    from convert.bundle_writer import write_bundle

    bundle = load_bundle(demo_bundle_dir)
    tflite = bundle.model_path.read_bytes()
    golden = {"crops": bundle.golden.crops, "probabilities": bundle.golden.probabilities, "cams": bundle.golden.cams}
    draft = dataclasses.replace(bundle.info, name="copy", tflite_sha256=None, golden=None, created=None)
    out = write_bundle(tmp_path / "copy", tflite, draft, golden, tolerance=0.05)
    copy = load_bundle(out)
    assert copy.info.name == "copy" and copy.sha256 == bundle.sha256 and copy.info.created
    assert copy.info.metrics == bundle.info.metrics and copy.info.quantization == bundle.info.quantization
    # A model.json the device would refuse is never written.
    broken = dataclasses.replace(draft, cam=dataclasses.replace(draft.cam, shape=(0, 3)))
    with pytest.raises(BundleError, match="cam.shape"):
        write_bundle(tmp_path / "broken", tflite, broken, golden, tolerance=0.05)
    assert not (tmp_path / "broken").exists() and not list(tmp_path.glob(".broken.*"))
