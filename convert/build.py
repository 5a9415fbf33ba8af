"""The conversion itself: a trained Keras model -> a verified model bundle.

`convert_bundle` measures the converted model against the float one with the
device's own classifier and refuses to write a bundle that fails the fidelity
gate (unless `force`). Mode "auto" climbs the quantization ladder, fastest
first: int8, int8 after quantization-aware fine-tuning (convert.qat), int8
with its worst layers kept in float, dynamic range, float16, int16x8, and
keeps the first that passes. Every mode tried is timed (per crop,
batch 1, through the device classifier) in the same run; the ladder with its
timings and gate figures goes into model.json and the convert report
(`convert_report.md` in the bundle, convert.report). `verify_bundle`
re-measures an existing bundle the same way.

Progress lines go to a `Progress` callback (by default, the "convert" logger);
failures are ConvertError / GateFailedError (convert.errors), or the device's
and dataset's own LeukoCamErrors. Nothing here prints or knows about click.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from convert.bundle_writer import sha256_bytes, write_bundle
from convert.errors import ConvertError, GateFailedError
from convert.qat import FineTuneOptions
from convert.report import REPORT_FILE, convert_report, ladder_markdown, order_notes
from convert.run_info import RunInfo, read_run_info
from convert.tflite import SIGNATURE
from convert.verify import Gate
from device.bundle import load_bundle
from device.bundle_meta import BundleMeta, CamInfo, OutputNames, QuantizationInfo
from device.preprocess import PreprocessContract

log = logging.getLogger("convert")

SELECTIVE_LAYERS = 10
QAT_MODE = "int8-qat"
"""Convert's name for int8 after quantization-aware fine-tuning; the bundle's runtime mode is int8."""
# The ladder, by expected speed on a Pi's CPU, fastest first: full int8 (XNNPACK int8 kernels); the same int8
# graph after quantization-aware fine-tuning (as fast as int8; minutes to make, so second); int8 with its
# worst layers in float (a few float ops and (de)quantize pairs); dynamic range (int8 weights, activations
# quantized on the fly); float16 (weights expanded to float, float kernels); int16x8 last (near-lossless but
# on slow reference kernels). The order is fixed; the latencies measured in each run are recorded beside it.
AUTO_SEQUENCE = (
    ("int8", 0),
    (QAT_MODE, 0),
    ("int8", SELECTIVE_LAYERS),
    ("dynamic", 0),
    ("float16", 0),
    ("int16x8", 0),
)
FLIPS_IN_META = 50
"""model.json keeps the first flips of the shipped mode; the convert report lists them all."""
GATE_ADVICE = (
    "the converted model fails the fidelity gate; no bundle was written. Try: more or better "
    "calibration crops (--calibration, --extra-calibration), --float-layers N (selective int8), "
    "--quant dynamic|float16|int16x8|auto; or --force to write it anyway (it will say so in model.json)"
)


def mode_label(mode: str, n_float: int) -> str:
    """How convert names a mode: "int8", "int8 quantization-aware", "int8 with 10 float layers", "dynamic", ..."""
    if mode == QAT_MODE:
        return "int8 quantization-aware"
    return mode + (f" with {n_float} float layers" if n_float else "")


class Progress(Protocol):
    """Where convert reports what it does: one message at a time; warnings are flagged."""

    def __call__(self, message: str, *, warning: bool = False) -> None: ...


def log_progress(message: str, *, warning: bool = False) -> None:
    """The default Progress: the "convert" logger."""
    log.log(logging.WARNING if warning else logging.INFO, message)


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


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class RunData:
    """What convert and verify need from a training run and its dataset."""

    model: object
    info: RunInfo
    calibration: np.ndarray
    held_out: np.ndarray
    """The gate's crops: the validation split (the test split is kept for reporting, once)."""
    labels: np.ndarray
    test_x: np.ndarray | None = None
    """The test split, measured once on the chosen bundle; None when DATA lacks it."""
    test_y: np.ndarray | None = None
    train_x: np.ndarray | None = None
    """The train split's crops (for quantization-aware fine-tuning); None when DATA lacks it."""
    train_y: np.ndarray | None = None
    gate_split: str = "validation"
    held_out_names: tuple[str, ...] | None = None
    """Each gate crop's file, relative to DATA (for the flips)."""

    @property
    def model_path(self) -> Path:
        return self.info.model_path

    @property
    def contract(self) -> PreprocessContract:
        return self.info.contract


def load_run(
    model_path,
    data_dir,
    calibration: int = 200,
    extra_calibration=None,
    seed: int = 0,
    progress: Progress = log_progress,
) -> RunData:
    """Load the Keras model, its run information, calibration crops (train split), the gate's crops (validation
    split) and the test crops (test split, reported once on the chosen bundle and never used to choose it).

    Raises:
        ConvertError: the model is not in a run folder convert can read (convert.run_info).
    """
    info = read_run_info(model_path)  # before TensorFlow: a wrong folder is said at once

    import keras

    from device.imaging import decode_image
    from device.preprocess import prepare_cell
    from training.datasets import load_images, read_dataset

    contract = info.contract
    model = keras.models.load_model(info.model_path, compile=False)
    samples = read_dataset(data_dir)
    by_path = {str(s.path): s for s in samples}

    def part(name: str):
        return [by_path[p] for p in info.split_files.of(name) if p in by_path]

    train_part, val_part, test_part = part("train"), part("val"), part("test")
    gate_part, gate_split = val_part, "validation"
    if not val_part:
        gate_part, gate_split = test_part, "test (the run has no validation split in DATA)"
    if not gate_part:
        gate_part, gate_split = samples, "all of DATA"
        progress(
            "warning: the model's validation and test splits are not in DATA; verifying on all of DATA, which "
            "may include training images and flatter the converted model",
            warning=True,
        )
    um = info.data_um_per_px
    xtrain, ytrain = load_images(train_part, contract, um_per_px=um)[:2] if train_part else (None, None)
    if calibration > 0:
        xc, yc = (xtrain, ytrain) if train_part else load_images(samples, contract, um_per_px=um)[:2]
        xc = xc[stratified_pick(yc, calibration, seed)]
    else:  # only extra calibration crops
        xc = np.zeros((0, contract.input_size, contract.input_size, 3), dtype=np.uint8)
    if extra_calibration:
        files = sorted(
            p for p in Path(extra_calibration).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp")
        )
        extra = [prepare_cell(decode_image(p), contract) for p in files]
        if extra:
            xc = np.concatenate([xc, np.stack(extra)])
        progress(f"calibration: {len(extra)} extra crops from {extra_calibration}")
    xg, yg, kept, _ = load_images(gate_part, contract, um_per_px=um)
    names = tuple(_relative(s.path, data_dir) for s in kept)
    xt, yt = (
        (load_images(test_part, contract, um_per_px=um)[:2])
        if test_part and gate_part is not test_part
        else (None, None)
    )
    return RunData(model, info, xc, xg, yg, xt, yt, xtrain, ytrain, gate_split, names)


def _relative(path, root) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return Path(path).name


def draft_meta(run: RunData, name: str | None, cam_shape, mode: str) -> BundleMeta:
    """model.json before conversion: everything the run decides (the quantization is filled in later)."""
    info = run.info
    return BundleMeta(
        name=name or info.run_dir.name,
        synthetic=info.synthetic,
        labels=info.labels,
        contract=info.contract,
        signature=SIGNATURE,
        input={
            "name": "image",
            "channels": "RGB",
            "range": [0, 255],
            "note": "Keras EfficientNet normalizes inside the graph; feed raw 0-255 pixels",
        },
        outputs=OutputNames(probability="probability", logit="logit", cam="cam"),
        threshold=info.threshold,
        review_band=info.review_band,
        cam=CamInfo(
            shape=tuple(cam_shape),
            layer=info.feature_layer,
            method="CAM from the Dense head weights (equals Grad-CAM up to scale for GAP+Dense)",
            sign="positive values = evidence for labels[1]; use -cam for labels[0]",
        ),
        quantization=QuantizationInfo(mode=mode),
        training={"data": info.data, "options": info.options, "test_metrics": info.test_metrics},
        source_model_sha256=sha256_bytes(info.model_path.read_bytes()),
    )


# -- convert ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvertOptions:
    """How to convert (the options of `leukocam convert`)."""

    mode: str = "int8"
    """int8, int8-qat, dynamic, int16x8, float16, float32, or auto (AUTO_SEQUENCE, first that passes the gate)."""
    calibration: int = 200
    """Calibration crops from the train split, stratified by class (0: only extra_calibration)."""
    extra_calibration: str | Path | None = None
    """A folder of extra calibration crops, e.g. cells captured on the rig."""
    float_layers: int = 0
    """int8: keep the N worst layers in float (selective int8)."""
    fine_tuning: FineTuneOptions = field(default_factory=FineTuneOptions)
    """int8-qat (and its rung of auto): how the quantization-aware fine-tuning runs."""
    gate: Gate | None = None
    """The fidelity gate; None: Gate()."""
    force: bool = False
    """Write the bundle even when the gate fails (model.json records it)."""
    golden: int = 8
    """Golden crops for the device's start-up self-test."""
    name: str | None = None
    """Model name shown on the dashboard; None: the run folder's name."""
    seed: int = 0
    max_mb: float | None = None
    """Skip modes whose model file is larger than this."""
    parity_fields: int = 30
    """SYNTHETIC fields also run through the device's whole field path beside the training path (0 skips);
    a significant sensitivity loss larger than the gate's max_delta_sensitivity fails the gate too."""
    latency_threads: int = 2
    """Interpreter threads when timing each mode (the device's default [model] threads)."""
    latency_repeats: int = 5
    """Timed single-crop calls per mode (the median is recorded), after two warm-up calls."""


@dataclass(frozen=True)
class ConvertResult:
    """A written bundle and how it was verified."""

    bundle_dir: Path
    meta: BundleMeta
    """model.json as written."""
    tflite_bytes: int
    failures: tuple[str, ...] = ()
    """Why the gate failed; empty when it passed (non-empty only with force)."""
    report: str = ""
    """The convert report (markdown), also written into the bundle as convert_report.md."""

    @property
    def verification(self) -> dict[str, Any]:
        """The chosen mode's float-against-converted comparison on the gate's split (convert.verify.compare)."""
        return dict(self.meta.verification or {})

    @property
    def mode(self) -> str:
        return self.meta.quantization.mode

    @property
    def forced(self) -> bool:
        return bool(self.failures)


@dataclass
class _Reference:
    """The float model's side of every comparison, computed once."""

    outputs: dict[str, np.ndarray]
    cams: np.ndarray
    golden_idx: np.ndarray
    draft: BundleMeta


@dataclass
class _Candidate:
    """One converted and verified mode."""

    mode: str
    float_layers: list[str]
    tflite: bytes
    verification: dict[str, Any]
    outputs: dict[str, np.ndarray]
    input_type: str
    failures: list[str]
    label: str = ""
    latency_ms: float | None = None
    warnings: list[str] = field(default_factory=list)
    fine_tuning: dict[str, Any] | None = None
    """int8-qat: how the fine-tuning ran (convert.qat)."""


@dataclass
class _Search:
    """The modes tried so far."""

    attempts: list[dict[str, Any]] = field(default_factory=list)
    worst: list[dict[str, Any]] = field(default_factory=list)
    chosen: _Candidate | None = None
    """The last mode that was verified."""
    ladder: tuple[str, ...] | None = None
    """The modes in the order they are tried ("auto" only)."""
    runtime: str = ""


def convert_bundle(
    model_path: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    options: ConvertOptions | None = None,
    progress: Progress = log_progress,
) -> ConvertResult:
    """Convert, verify with the device classifier, gate, and write the bundle (with its convert report).

    Raises:
        ConvertError: the run folder cannot be read, or no mode fits `max_mb`; nothing was written.
        GateFailedError: the chosen mode fails the gate (and not `force`); nothing was written.
    """
    from convert.tflite import float_outputs
    from convert.verify import reference_gradcam

    opts = options or ConvertOptions()
    gate = opts.gate or Gate()
    run = load_run(model_path, data_dir, opts.calibration, opts.extra_calibration, opts.seed, progress)
    float_test = float_outputs(run.model, run.held_out)
    ref = _Reference(
        float_test,
        reference_gradcam(run.model, run.held_out, float_test["probability"], run.info.threshold),
        stratified_pick(run.labels, opts.golden, opts.seed + 1),
        draft_meta(run, opts.name, float_test["cam"].shape[1:3], opts.mode),
    )
    search = _search_modes(run, ref, opts, gate, progress)
    chosen = search.chosen
    if chosen is None:
        raise ConvertError(f"no mode fits the {opts.max_mb} MB limit; no bundle was written")
    failures = list(chosen.failures)
    parity = None
    if opts.parity_fields:
        parity = check_field_parity(
            chosen.tflite, ref.draft, chosen.mode, opts.parity_fields, gate.max_delta_sensitivity, opts.seed, progress
        )
        if not parity["passed"]:
            failures.append(f"field path loses sensitivity: {parity['reason']}")
    if failures:
        _report_failure(run, search, chosen, failures, opts.force, progress)
    for attempt in search.attempts:
        if attempt["mode"] == chosen.label and not attempt.get("skipped"):
            attempt["chosen"] = True
    all_flips = chosen.verification.get("flips") or []
    verification = {
        **chosen.verification,
        "flips": all_flips[:FLIPS_IN_META],
        "split": run.gate_split,
        "gate_crops": int(chosen.verification["n"]),
        "gate_crops_enough": int(chosen.verification["n"]) >= gate.min_crops,
    }
    meta = dataclasses.replace(
        ref.draft,
        quantization=QuantizationInfo(
            mode=chosen.mode,
            float_layers=tuple(chosen.float_layers),
            calibration_images=int(len(run.calibration)),
            input_type=chosen.input_type,
            attempts=tuple(search.attempts),
            worst_layers=tuple(search.worst[:10]) if search.worst else None,
            ladder=search.ladder,
            latency=_latency_summary(search, chosen, opts),
            fine_tuning=chosen.fine_tuning,
        ),
        verification=verification,
        field_parity=parity,
        gate={
            **gate.to_dict(),
            "passed": not failures,
            "failures": failures,
            "forced": bool(failures and opts.force),
            "warnings": list(chosen.warnings),
            "per_class": gate.class_failures(chosen.verification),
        },
    )
    metrics = measure_test_split(run, chosen.tflite, meta, chosen.mode, run.info.threshold) or {
        "split": run.gate_split,
        "float": verification.get("float_metrics"),
        "quantized": verification.get("quantized_metrics"),
    }
    meta = dataclasses.replace(meta, metrics=metrics)
    golden_set = {
        "crops": run.held_out[ref.golden_idx],
        "probabilities": chosen.outputs["probability"][ref.golden_idx],
        "cams": chosen.outputs["cam"][ref.golden_idx],
    }
    text = convert_report(meta, all_flips, tflite_bytes=len(chosen.tflite))
    out = write_bundle(out_dir, chosen.tflite, meta, golden_set, tolerance=0.05, extra_files={REPORT_FILE: text})
    for warning in chosen.warnings:
        progress(f"warning: {warning}", warning=True)
    progress(f"convert report: {out / REPORT_FILE}")
    return ConvertResult(
        bundle_dir=out,
        meta=load_bundle(out).info,
        tflite_bytes=len(chosen.tflite),
        failures=tuple(failures),
        report=text,
    )


def _search_modes(run: RunData, ref: _Reference, opts: ConvertOptions, gate: Gate, progress: Progress) -> _Search:
    """Convert, time and verify each mode in turn until one passes the gate (one mode unless "auto")."""
    from convert.qat import fine_tune_for_int8
    from convert.tflite import convert, layer_errors
    from device.runtime import runtime_name

    search = _Search(runtime=runtime_name())
    if opts.mode == "auto":
        search.ladder = tuple(mode_label(m, n) for m, n in AUTO_SEQUENCE)
    for mode, n_float in AUTO_SEQUENCE if opts.mode == "auto" else ((opts.mode, opts.float_layers),):
        label = mode_label(mode, n_float)
        if n_float and not search.worst:
            search.worst = layer_errors(run.model, run.calibration)
        keep_float = [w["tensor"] for w in search.worst[:n_float]]
        record: dict[str, Any] = {"mode": label, "quant": mode, "float_layers": len(keep_float)}
        if n_float and len(search.worst) <= n_float:
            reason = (
                f"the model has only {len(search.worst)} quantized tensors: keeping {n_float} in float leaves "
                "nothing in int8"
            )
            _skip_or_raise(search, record, label, reason, opts, progress)
            continue
        source, tuning = run.model, None
        if mode == QAT_MODE:
            if run.train_x is None or len(np.unique(run.train_y)) < 2:
                reason = "quantization-aware fine-tuning needs the train split's crops of both classes in DATA"
                _skip_or_raise(search, record, label, reason, opts, progress)
                continue
            progress(f"fine-tuning for int8: {label}, up to {opts.fine_tuning.max_crops} train crops ...")
            try:
                pick = np.sort(stratified_pick(run.train_y, opts.fine_tuning.max_crops, opts.seed))
                source, tuning = fine_tune_for_int8(
                    run.model,
                    run.train_x[pick],
                    run.info.threshold,
                    run.calibration,
                    opts.fine_tuning,
                    progress,
                )
            except ValueError as exc:  # a model with no tensor int8 would round
                _skip_or_raise(search, record, label, f"fine-tuning failed: {exc}", opts, progress)
                continue
            record["quant"], record["fine_tuning"] = "int8", tuning
        progress(f"converting: {label}, {len(run.calibration)} calibration crops ...")
        try:
            tflite = convert(source, run.calibration, record["quant"], float_layers=keep_float or None)
        except ValueError as exc:  # the converter's or the QuantizationDebugger's refusal
            _skip_or_raise(search, record, label, f"the converter failed: {exc}", opts, progress)
            continue
        record["bytes"] = len(tflite)
        if opts.max_mb is not None and len(tflite) > opts.max_mb * 1e6:
            reason = f"model file {len(tflite) / 1e6:.1f} MB > {opts.max_mb} MB limit"
            ms = _time_only(run, ref, record["quant"], tflite, opts)
            progress(f"  {label}: skipped, {reason} ({ms:.2f} ms per crop)")
            search.attempts.append(
                {**record, "passed": False, "failures": [reason], "skipped": reason, "latency_ms": ms}
            )
            continue
        candidate = _verify_mode(run, ref, record["quant"], keep_float, tflite, gate, label, opts, progress)
        candidate.fine_tuning = tuning
        search.attempts.append({**record, **_attempt_figures(candidate)})
        search.chosen = candidate
        if not candidate.failures:
            break
    return search


def _skip_or_raise(
    search: _Search, record: dict[str, Any], label: str, reason: str, opts: ConvertOptions, progress: Progress
) -> None:
    """A mode that cannot be converted: the next rung of the ladder ("auto"), else a ConvertError."""
    if opts.mode != "auto":
        raise ConvertError(f"{label}: {reason}; no bundle was written")
    progress(f"  {label}: skipped, {reason}", warning=True)
    search.attempts.append({**record, "passed": False, "failures": [reason], "skipped": reason})


def _attempt_figures(c: _Candidate) -> dict[str, Any]:
    """What model.json's quantization.attempts records of one verified mode."""
    v = c.verification
    return {
        "passed": not c.failures,
        "failures": c.failures,
        "latency_ms": c.latency_ms,
        "n": v["n"],
        "label_agreement": v["label_agreement"],
        "delta_sensitivity": v.get("delta_sensitivity"),
        "delta_specificity": v.get("delta_specificity"),
        "cam_correlation_mean": v.get("cam_correlation_mean"),
        "mean_abs_dprob": v.get("mean_abs_dprob"),
        "max_abs_dprob": v.get("max_abs_dprob"),
        "flips": v.get("flips_total", 0),
        "per_class": {
            role: {k: pc[k] for k in ("label", "n", "label_agreement", "flips", "metric", "delta")}
            for role, pc in (v.get("per_class") or {}).items()
        },
    }


def _latency_summary(search: _Search, chosen: _Candidate, opts: ConvertOptions) -> dict[str, Any] | None:
    """model.json's quantization.latency: the shipped mode's per-crop time, against int8's of the same run."""
    from convert.bench import cpu_name

    if chosen.latency_ms is None:
        return None
    int8_ms = next(
        (a["latency_ms"] for a in search.attempts if a["mode"] == "int8" and a.get("latency_ms") is not None), None
    )
    notes = order_notes(search.attempts)
    return {
        "ms_per_crop": chosen.latency_ms,
        "threads": opts.latency_threads,
        "batch": 1,
        "repeats": opts.latency_repeats,
        "cpu": cpu_name(),
        "runtime": search.runtime,
        "int8_ms_per_crop": int8_ms,
        "vs_int8": None if not int8_ms else chosen.latency_ms / int8_ms,
        "order_agrees": not notes,
        "order_note": "; ".join(notes) or None,
    }


def _staging(folder: Path, run: RunData, ref: _Reference, mode: str, tflite: bytes) -> Path:
    """A provisional bundle (float outputs as golden, loose tolerance) so the device classifier can load it."""
    return write_bundle(
        folder / "staging",
        tflite,
        dataclasses.replace(ref.draft, quantization=QuantizationInfo(mode=mode)),
        {
            "crops": run.held_out[ref.golden_idx],
            "probabilities": ref.outputs["probability"][ref.golden_idx],
            "cams": ref.outputs["cam"][ref.golden_idx],
        },
        tolerance=1.0,
    )


def _time_only(run: RunData, ref: _Reference, mode: str, tflite: bytes, opts: ConvertOptions) -> float:
    """The per-crop latency of a mode that is not verified (skipped for its size)."""
    from convert.verify import latency_ms
    from device.classifier import Classifier

    with tempfile.TemporaryDirectory() as tmp:
        staging = _staging(Path(tmp), run, ref, mode, tflite)
        with Classifier(load_bundle(staging), threads=opts.latency_threads) as clf:
            return latency_ms(clf, run.held_out[0], opts.latency_repeats)


def _verify_mode(
    run: RunData,
    ref: _Reference,
    mode: str,
    keep_float: list[str],
    tflite: bytes,
    gate: Gate,
    label: str,
    opts: ConvertOptions,
    progress: Progress,
) -> _Candidate:
    """Run one converted model through the device classifier, time it, and compare it with the float model."""
    from convert.verify import batched_raw, compare, latency_ms, report
    from device.classifier import Classifier

    with tempfile.TemporaryDirectory() as tmp:
        staging = _staging(Path(tmp), run, ref, mode, tflite)
        with Classifier(load_bundle(staging), threads=opts.latency_threads) as clf:
            quant_test, input_dtype = batched_raw(clf, run.held_out), clf.input_dtype
            ms = latency_ms(clf, run.held_out[0], opts.latency_repeats)
    verification = compare(
        ref.outputs,
        quant_test,
        run.labels,
        run.info.threshold,
        ref.cams,
        names=run.held_out_names,
        label_names=run.info.labels,
    )
    failures = gate.failures(verification)
    warnings = gate.warnings(verification)
    progress(report(verification, label, failures, warnings, gate.class_failures(verification)))
    progress(f"  latency {ms:.2f} ms per crop (batch 1, {opts.latency_threads} threads, device classifier)")
    return _Candidate(mode, keep_float, tflite, verification, quant_test, input_dtype, failures, label, ms, warnings)


def _report_failure(
    run: RunData, search: _Search, chosen: _Candidate, failures: list[str], force: bool, progress: Progress
) -> None:
    """Say which layers quantize worst and show the ladder; raise GateFailedError unless forced."""
    from convert.tflite import layer_errors

    if not search.worst and chosen.mode == "int8":
        search.worst = layer_errors(run.model, run.calibration)
    if search.worst:
        progress("layers with the largest int8 quantization error (rmse in quantization steps):")
        for w in search.worst[:8]:
            progress(f"  {w['rmse_per_scale']:7.2f}  {w['op']:<16} {w['tensor'][:90]}")
    progress(ladder_markdown(search.attempts, search.ladder))
    if not force:
        raise GateFailedError(GATE_ADVICE, chosen.verification, failures)
    progress(f"--force: writing the {chosen.label or chosen.mode} bundle although it fails the gate", warning=True)


def _provisional_bundle(folder: Path, tflite: bytes, meta: BundleMeta, mode: str) -> Path:
    """A bundle the device's classifier can load for measuring (its blank golden crop is never self-tested)."""
    size = meta.input_size
    golden = {
        "crops": np.zeros((1, size, size, 3), np.uint8),
        "probabilities": np.zeros(1, np.float32),
        "cams": np.zeros((1, *meta.cam.shape), np.float32),
    }
    return write_bundle(
        folder / "provisional",
        tflite,
        dataclasses.replace(meta, quantization=QuantizationInfo(mode=mode)),
        golden,
        tolerance=1.0,
    )


def measure_test_split(run: RunData, tflite: bytes, meta: BundleMeta, mode: str, threshold: float) -> dict | None:
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
    return {
        "split": "test",
        "n": int(len(run.test_y)),
        "float": binary_metrics(run.test_y, flt["probability"], threshold),
        "quantized": binary_metrics(run.test_y, quant["probability"], threshold),
    }


def check_field_parity(
    tflite: bytes,
    meta: BundleMeta,
    mode: str,
    n_fields: int,
    max_loss: float,
    seed: int,
    progress: Progress = log_progress,
) -> dict:
    """The field-path parity of a converted model, through the device's own classifier (training.parity)."""
    from device.classifier import Classifier
    from training.parity import ParityGate, field_parity, parity_markdown

    with tempfile.TemporaryDirectory() as tmp:
        with Classifier(load_bundle(_provisional_bundle(Path(tmp), tflite, meta, mode)), threads=2) as clf:
            parity = field_parity(clf, n_fields=n_fields, seed=seed, gate=ParityGate(max_sensitivity_loss=max_loss))
    progress(parity_markdown(parity))
    return parity


# -- verify ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifyResult:
    """An existing bundle measured again against its float model."""

    verification: Mapping[str, Any]
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures


def verify_bundle(
    bundle_dir: str | Path,
    model_path: str | Path,
    data_dir: str | Path,
    gate: Gate | None = None,
    progress: Progress = log_progress,
) -> VerifyResult:
    """Re-verify an existing bundle against its float model on the model's held-out split.

    Raises:
        BundleError: the bundle does not load. ConvertError: the model's run folder cannot be read.
    """
    from convert.tflite import float_outputs
    from convert.verify import compare, device_outputs, reference_gradcam, report

    gate = gate or Gate()
    bundle = load_bundle(bundle_dir)
    run = load_run(model_path, data_dir, calibration=2, progress=progress)
    threshold = bundle.threshold
    float_test = float_outputs(run.model, run.held_out)
    ref = reference_gradcam(run.model, run.held_out, float_test["probability"], threshold)
    quant_test, _ = device_outputs(bundle_dir, run.held_out)
    verification = compare(
        float_test, quant_test, run.labels, threshold, ref, names=run.held_out_names, label_names=bundle.labels
    )
    failures = gate.failures(verification)
    warnings = gate.warnings(verification)
    verification["gate_crops"] = int(verification["n"])
    verification["gate_crops_enough"] = int(verification["n"]) >= gate.min_crops
    progress(
        report(verification, bundle.info.quantization.label, failures, warnings, gate.class_failures(verification))
    )
    return VerifyResult(verification, tuple(failures))
