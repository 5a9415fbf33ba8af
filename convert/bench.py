"""Model benchmarks: size and latency of the converted modes against the Keras model, in one run.

Every number in a table comes from the same process on the same machine, so
the ratios (int8 / float32, TFLite / Keras) are meaningful even where the
absolute times are not. Latency is the median of repeated calls after a
warm-up; the device's own Classifier runs the TFLite models.
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def cpu_name() -> str:
    """The CPU model as the OS reports it."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
        info = {k.strip().lower(): v.strip() for k, v in info.items()}
        for key in ("model name", "hardware", "cpu model"):  # x86, then Raspberry Pi kernels
            if info.get(key):
                return info[key]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


LADDER = ("int8", "int8-selective", "dynamic", "float16", "int16x8", "float32")
"""The per-crop latency table: `leukocam convert --quant auto`'s ladder in its order, then float32 (the reference)."""


def bench_models(
    size: int = 300,
    modes=("int8", "float16", "float32"),
    batches=(1, 5, 8),
    threads=(1, 2, 4),
    repeats: int = 5,
    calibration: int = 16,
    seed: int = 0,
    keep_dir: str | Path | None = None,
    ladder=LADDER,
    ladder_threads: int = 2,
    ladder_size: int | None = None,
    selective_layers: int = 10,
) -> dict:
    """Build an EfficientNetB3 (random weights: latency does not depend on them), convert it, time everything.

    `modes` get the full grid (threads x batches) at `size`; every mode in `ladder` gets its per-crop latency at
    batch 1 with `ladder_threads` (the device's default) at `ladder_size` (default `size`; `leukocam bench` passes
    the shipped bundle's), as `leukocam convert --quant auto` times its ladder. "int8-selective" is int8 with the
    `selective_layers` worst layers (QuantizationDebugger) left in float.
    With keep_dir, the int8 bundle is kept there (keep_dir/int8) for the pipeline benchmark of the same run.
    """
    import keras
    import tensorflow as tf

    from device.classifier import Classifier

    keras.utils.set_random_seed(seed)
    ladder_size = ladder_size or size
    grid = _Converted(size, max(calibration, max(batches)), calibration, selective_layers, seed)
    model, crops = grid.model, grid.crops
    rows = []
    graph_call = tf.function(lambda x: model(x, training=False))  # graph mode, as model.predict runs it
    for b in batches:
        x = tf.constant(crops[:b].astype(np.float32))
        rows.append(
            {
                "model": "keras float32",
                "batch": b,
                "threads": "tf default",
                "size_mb": None,
                "ms": median_ms(lambda x=x: graph_call(x).numpy(), repeats),
            }
        )
    with tempfile.TemporaryDirectory() as tmp:
        keras_path = Path(tmp) / "model.keras"
        model.save(keras_path)
        keras_mb = keras_path.stat().st_size / 1e6
        for mode in modes:
            bundle = grid.bundle(mode, Path(tmp) / str(size))
            if keep_dir is not None and mode == "int8":
                shutil.rmtree(Path(keep_dir) / "int8", ignore_errors=True)
                shutil.copytree(bundle.path, Path(keep_dir) / "int8")
            for t in threads:
                with Classifier(bundle, threads=t) as clf:
                    for b in batches:
                        rows.append(
                            {
                                "model": f"tflite {mode}",
                                "batch": b,
                                "threads": t,
                                "size_mb": len(grid.tflite(mode)) / 1e6,
                                "ms": median_ms(lambda b=b, clf=clf: clf.raw(crops[:b]), repeats),
                            }
                        )
        small = grid if ladder_size == size else _Converted(ladder_size, 1, calibration, selective_layers, seed)
        ladder_rows = []
        for mode in ladder:
            with Classifier(small.bundle(mode, Path(tmp) / str(ladder_size)), threads=ladder_threads) as clf:
                ladder_rows.append(
                    {
                        "mode": mode,
                        "size_mb": len(small.tflite(mode)) / 1e6,
                        "input": clf.input_dtype,
                        "ms_per_crop": median_ms(lambda clf=clf: clf.raw(small.crops[:1]), repeats),
                    }
                )
    base = {r["batch"]: r["ms"] for r in rows if r["model"] == "tflite float32" and r["threads"] == 2}
    keras_ms = {r["batch"]: r["ms"] for r in rows if r["model"] == "keras float32"}
    for r in rows:
        r["per_image_ms"] = r["ms"] / r["batch"]
        r["vs_tflite_float32_2t"] = r["ms"] / base[r["batch"]] if r["batch"] in base else None
        r["vs_keras"] = r["ms"] / keras_ms[r["batch"]]
    int8_ms = next((r["ms_per_crop"] for r in ladder_rows if r["mode"] == "int8"), None)
    for r in ladder_rows:
        r["vs_int8"] = r["ms_per_crop"] / int8_ms if int8_ms else None
    return {
        "benchmark": "models",
        "input_size": size,
        "backbone": "efficientnetb3",
        "cpu": cpu_name(),
        "cores": __import__("os").cpu_count(),
        "keras_file_mb": keras_mb,
        "repeats": repeats,
        "rows": rows,
        "ladder": ladder_rows,
        "ladder_size": ladder_size,
        "ladder_threads": ladder_threads,
        "selective_layers": selective_layers,
    }


class _Converted:
    """An EfficientNetB3 at one input size, with synthetic crops, and its TFLite conversions made on demand."""

    def __init__(self, size: int, n_crops: int, calibration: int, selective_layers: int, seed: int):
        from convert.tflite import float_outputs
        from training.model import build_model
        from training.synth import render_cell

        rng = np.random.default_rng(seed)
        self.size, self.calibration, self.selective_layers = size, calibration, selective_layers
        self.crops = np.stack(
            [render_cell(rng, "all" if i % 2 else "hem", size=size) for i in range(max(calibration, n_crops, 2))]
        )
        self.model = build_model(size, "efficientnetb3", weights=None)
        self.ref = float_outputs(self.model, self.crops[:2])
        self._tflite: dict[str, bytes] = {}

    def tflite(self, mode: str) -> bytes:
        from convert.tflite import convert, layer_errors

        if mode not in self._tflite:
            cal = self.crops[: self.calibration]
            if mode == "int8-selective":
                worst = layer_errors(self.model, cal, samples=min(self.calibration, 4))
                keep = [w["tensor"] for w in worst[: self.selective_layers]]
                self._tflite[mode] = convert(self.model, cal, "int8", float_layers=keep or None)
            else:
                self._tflite[mode] = convert(self.model, cal, mode)
        return self._tflite[mode]

    def bundle(self, mode: str, folder: Path):
        """A bundle the device classifier can load for timing (its golden outputs are the float model's)."""
        from convert.bundle_writer import write_bundle
        from device.bundle import load_bundle
        from device.preprocess import PreprocessContract

        path = folder / mode
        if not path.is_dir():
            meta = {
                "labels": ["normal", "blast"],
                "input_size": self.size,
                "preprocess": PreprocessContract(input_size=self.size).to_dict(),
                "signature": "serving_default",
                "outputs": {"probability": "probability", "logit": "logit", "cam": "cam"},
                "threshold": 0.5,
                "review_band": [0.3, 0.7],
                "cam": {"shape": list(self.ref["cam"].shape[1:3])},
                "quantization": {"mode": "int8" if mode == "int8-selective" else mode},
                "name": f"bench-{mode}",
            }
            golden = {"crops": self.crops[:2], "probabilities": self.ref["probability"], "cams": self.ref["cam"]}
            write_bundle(path, self.tflite(mode), meta, golden, tolerance=1.0)
        return load_bundle(path)


def to_markdown(result: dict) -> str:
    lines = [
        f"### Model latency at {result['input_size']} px ({result['backbone']}), CPU: {result['cpu']} ({result['cores']} cores)",
        "",
        f"Keras .keras file: {result['keras_file_mb']:.1f} MB. Median of {result['repeats']} runs; ratios from the same run.",
        "",
        "| model | threads | batch | size MB | ms / call | ms / image | × tflite float32 (2 threads) | × Keras |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        size = "" if r["size_mb"] is None else f"{r['size_mb']:.1f}"
        vs = "" if r["vs_tflite_float32_2t"] is None else f"{r['vs_tflite_float32_2t']:.2f}"
        lines.append(
            f"| {r['model']} | {r['threads']} | {r['batch']} | {size} | {r['ms']:.1f} | {r['per_image_ms']:.1f} | {vs} | {r['vs_keras']:.2f} |"
        )
    if result.get("ladder"):
        lines += [
            "",
            f"### Quantization ladder at {result.get('ladder_size', result['input_size'])} px: per-crop latency (batch 1, "
            f"{result['ladder_threads']} threads), same run",
            "",
            "The modes in the order `leukocam convert --quant auto` tries them, then float32 for reference; "
            f"int8-selective keeps the {result['selective_layers']} worst layers in float.",
            "",
            "| mode | input | size MB | ms / crop | × int8 |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in result["ladder"]:
            vs = "" if r["vs_int8"] is None else f"{r['vs_int8']:.2f}"
            lines.append(f"| {r['mode']} | {r['input']} | {r['size_mb']:.1f} | {r['ms_per_crop']:.2f} | {vs} |")
    return "\n".join(lines) + "\n"


def write_results(results: list[dict], out_dir: str | Path) -> Path:
    """Write bench.json and bench.md into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    md = "\n".join(r["markdown"] for r in results)
    (out / "bench.md").write_text(md)
    return out / "bench.md"


PIPELINE_CHILD = r"""
import json, sys, time, dataclasses
from device.config import Config, CameraConfig, FinderConfig, ModelConfig, StoreConfig, ServiceConfig
from device.service import Appliance
from device.web import create_app
replay, bundle, store, n, um = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
cfg = Config(camera=CameraConfig(replay_dir=replay), model=ModelConfig(bundle=bundle, threads=2),
             store=StoreConfig(data_dir=store, min_free_mb=1), service=ServiceConfig(startup_captures=0),
             finder=FinderConfig(um_per_px=um))
rows = []
times = []
import numpy as np
from device.pipeline import CLASSIFY_BATCH
with Appliance(cfg) as app:
    create_app(app)  # the dashboard lives in the same process on the Pi
    size = app.bundle.info.input_size
    for i in range(n + 1):
        t = time.perf_counter()
        out = app.capture_now("bench")
        total = (time.perf_counter() - t) * 1000
        app.wait_archived()  # the crop PNGs and field JPEG follow the result; the operator moves the stage meanwhile
        cap = app.store.get_capture(out.capture_id)
        # Pure model time on as many crops, batched as the pipeline batches them, right after each
        # capture: side by side, so a noisy machine slows both alike.
        crops = np.repeat(app.bundle.golden.crops[:1], max(1, cap["n_cells"]), axis=0)
        t = time.perf_counter()
        app.classifier.classify(crops, batch_size=CLASSIFY_BATCH)
        model = (time.perf_counter() - t) * 1000
        if i == 0:
            continue  # warm-up
        rows.append({"total": total, "n_cells": cap["n_cells"], **cap["timings"]})
        times.append(model)
# VmHWM is this process's own peak RSS (getrusage would also count the parent's pages copied at fork).
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print("RESULT" + json.dumps({"rows": rows, "model_ms": sorted(times)[len(times) // 2], "after_vs_model": sorted(
                                 (r["total"] - r.get("capture", 0.0)) / m for r, m in zip(rows, times))[len(rows) // 2],
                             "runtime": app.classifier.runtime,
                             "peak_rss_kb": hwm,
                             "quantization": app.bundle.info.quantization.mode, "input_size": size}))
"""


def bench_pipeline(
    bundle_dir: str | Path,
    width: int = 4056,
    height: int = 3040,
    cells: int = 5,
    captures: int = 5,
    seed: int = 0,
    um_per_px: float = 0.1,
) -> dict:
    """Capture-to-result latency by stage on the replay camera, against pure model time; peak RSS of the process.

    The appliance runs in a child process so that its peak RSS is measured on its own. The pixel
    size is calibrated in its config, as on a rig after `leukocam calibrate`.
    """
    import subprocess
    import sys

    from device.imaging import atomic_write_bytes, encode_image
    from training.synth import render_field

    with tempfile.TemporaryDirectory() as tmp:
        field, truth = render_field(np.random.default_rng(seed), width, height, cells, um_per_px=um_per_px)
        atomic_write_bytes(Path(tmp) / "replay" / "field.jpg", encode_image(field, "JPEG", quality=92))
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                PIPELINE_CHILD,
                str(Path(tmp) / "replay"),
                str(bundle_dir),
                str(Path(tmp) / "store"),
                str(captures),
                str(um_per_px),
            ],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"pipeline benchmark failed:\n{proc.stderr[-2000:]}")
    data = json.loads(proc.stdout.split("RESULT", 1)[1])
    rows = data["rows"]
    stages = [k for k in rows[0] if k not in ("total", "n_cells")]
    med = {k: statistics.median(r[k] for r in rows) for k in ["total", *stages]}
    # What happens after the frame has arrived: everything but the camera (here: reading the replay file).
    after_frame = statistics.median(r["total"] - r.get("capture", 0.0) for r in rows)
    return {
        "benchmark": "pipeline",
        "cpu": cpu_name(),
        "cores": __import__("os").cpu_count(),
        "field": [width, height],
        "true_cells": len(truth),
        "found_cells": rows[-1]["n_cells"],
        "captures": len(rows),
        "median_ms": med,
        "model_ms": data["model_ms"],
        "model_share": data["model_ms"] / med["total"],
        "peak_rss_mb": data["peak_rss_kb"] / 1024,
        "after_frame_ms": after_frame,
        "after_frame_vs_model": data["after_vs_model"],
        "runtime": data["runtime"],
        "quantization": data["quantization"],
        "input_size": data["input_size"],
        "bundle": str(bundle_dir),
    }


STAGE_NOTES = {
    "total": "capture to result (wall clock)",
    "capture": "read and decode the replay JPEG (the camera on a rig)",
    "scale": "one 0.4 µm/px working copy of the frame (calibrated pixel size), and the field check on it",
    "find": "nuclei at 0.8 µm/px (the copy halved once more); then the waits for the kept cells' outlines, cut at 0.4 "
    "in worker threads beside the model",
    "qc": "beside the finder, in its own thread",
    "crop": "each cell cut from the 12 MP frame and resized for the model",
    "classify": "the model, one crop per call; each cell's overlay starts beside the next crop",
    "cells": "waiting for the last cells' heatmap overlay, hash and heatmap JPEG (one cell per thread)",
    "store": "heatmap files and rows of the result, fsynced",
    "archive": "the cells' lossless crop PNGs and the 12 MP field JPEG, after the result (not in the total)",
    "scale_check": "red cells against the calibration, after the result (not in the total)",
}


def pipeline_markdown(r: dict) -> str:
    lines = [
        f"### Capture to result: {r['field'][0]}×{r['field'][1]} synthetic field, {r['found_cells']} of {r['true_cells']} cells found, "
        f"replay camera; CPU: {r['cpu']} ({r['cores']} cores)",
        "",
        f"Bundle {r['bundle']} ({r['quantization']}, {r['input_size']} px, {r['runtime']}); median of {r['captures']} captures.",
        "",
        "| stage | ms | |",
        "| --- | --- | --- |",
    ]
    for k, v in r["median_ms"].items():
        lines.append(f"| {k} | {v:.1f} | {STAGE_NOTES.get(k, '')} |")
    lines += [
        "",
        f"Pure model time for the same {r['found_cells']} crops: {r['model_ms']:.1f} ms = "
        f"{r['model_share']:.0%} of capture-to-result. Everything after the frame arrived until the result is "
        "stored (QC, find, crop, classify, CAM overlays and heatmap JPEGs, store; the archival crop PNGs and "
        f"field JPEG, and the scale check, follow it): "
        f"{r['after_frame_ms']:.0f} ms, **{r['after_frame_vs_model']:.2f}× the pure model time** (median of "
        f"the per-capture ratios, each against a model run right after it; target ≤ 2×). Peak RSS of the appliance process: {r['peak_rss_mb']:.0f} MB "
        "(target ≤ 300 MB).",
        "",
    ]
    return "\n".join(lines)


def bench_finder(
    model_ms_5: float | None,
    width: int = 4056,
    height: int = 3040,
    cells: int = 5,
    repeats: int = 5,
    um_per_px: float = 0.1,
    corpus: str | Path | None = None,
    bccd: str | Path | None = None,
    synth_fields: int = 5,
    seed: int = 0,
    bundle_dir: str | Path | None = None,
) -> dict:
    """The finder on a 12 MP field against the int8 model on its crops, and its stress table, in one run.

    Args:
        model_ms_5: int8 model time for `cells` crops at 300 px (2 threads), from the models benchmark of
            this run; None leaves the ratio out (unless `bundle_dir` is given).
        corpus: a stress corpus folder; None builds a small one from `bccd` and synthetic fields.
        bundle_dir: a 300 px int8 bundle: the finder and the model on the found cells' crops are then
            timed turn about (find, classify, find, ...), so that a noisy machine slows both alike.
    """
    from device.cells import FinderParams, check_scale, estimate_um_per_px, find_white_cells, working_copy
    from training.finder_eval import DEFAULT_BCCD, corpus_markdown, evaluate_corpus
    from training.stress import build_corpus
    from training.synth import render_field

    field, truth = render_field(np.random.default_rng(seed), width, height, cells, um_per_px=um_per_px)
    options = FinderParams(um_per_px=um_per_px)
    found_cells = find_white_cells(field, options)
    found = len(found_cells)
    if bundle_dir is not None and found:
        from device.bundle import load_bundle
        from device.classifier import Classifier
        from device.pipeline import CLASSIFY_BATCH
        from device.preprocess import crop_cell

        with Classifier(load_bundle(bundle_dir), threads=2) as clf:
            crops = np.stack(
                [crop_cell(field, c.box, c.mask, clf.bundle.contract, um_per_px=um_per_px) for c in found_cells]
            )
            clf.classify(crops, batch_size=CLASSIFY_BATCH)
            find_times, model_times = [], []
            for _ in range(repeats):
                find_times.append(median_ms(lambda: find_white_cells(field, options), 1, warmup=0))
                model_times.append(median_ms(lambda: clf.classify(crops, batch_size=CLASSIFY_BATCH), 1, warmup=0))
        find_ms, model_ms_5 = statistics.median(find_times), statistics.median(model_times)
    else:
        find_ms = median_ms(lambda: find_white_cells(field, options), repeats, warmup=1)
    # As the appliance runs it: on the finder's working copy, after the result.
    small = working_copy(field, um_per_px)
    factor = small.shape[1] / field.shape[1]
    check_ms = median_ms(lambda: check_scale(small, um_per_px, factor=factor), repeats, warmup=1)
    estimate_ms = median_ms(lambda: estimate_um_per_px(field), 3, warmup=1)
    with tempfile.TemporaryDirectory() as tmp:
        if corpus is None:
            corpus = Path(tmp) / "corpus"
            build_corpus(corpus, Path(bccd or DEFAULT_BCCD), synth_fields=synth_fields)
        rows = evaluate_corpus(corpus)
    return {
        "benchmark": "finder",
        "cpu": cpu_name(),
        "cores": __import__("os").cpu_count(),
        "field": [width, height],
        "true_cells": len(truth),
        "found_cells": found,
        "find_ms": find_ms,
        "scale_check_ms": check_ms,
        "scale_estimate_ms": estimate_ms,
        "model_ms": model_ms_5,
        "side_by_side": bundle_dir is not None and bool(found),
        "find_vs_model": None if model_ms_5 is None else find_ms / model_ms_5,
        "corpus": str(corpus),
        "stress": rows,
        "stress_markdown": corpus_markdown(rows),
    }


def finder_markdown(r: dict) -> str:
    ratio = (
        ""
        if r["model_ms"] is None
        else f"int8 EfficientNetB3 at 300 px on the same {r['found_cells']} crops (2 threads, "
        f"{'timed turn about with the finder' if r.get('side_by_side') else 'this run'}): "
        f"{r['model_ms']:.1f} ms; **finder / model = {r['find_vs_model']:.1f}×** (target ≤ 1×).\n\n"
    )
    return (
        f"### White-cell finder: {r['field'][0]}×{r['field'][1]} synthetic field, {r['found_cells']} of "
        f"{r['true_cells']} cells found; CPU: {r['cpu']} ({r['cores']} cores)\n\n"
        f"Find with a calibrated pixel size: {r['find_ms']:.0f} ms. Cheap scale check per capture: "
        f"{r['scale_check_ms']:.0f} ms; a full red-cell estimate (what an uncalibrated rig pays): "
        f"{r['scale_estimate_ms']:.0f} ms.\n\n"
        + ratio
        + f"Stress corpus ({r['corpus']}):\n\n"
        + r["stress_markdown"]
        + "\n"
    )


def bench_training(size: int = 96, batch: int = 16, steps: int = 5, seed: int = 0) -> dict:
    """Training throughput in images/s: stage 1 (frozen backbone: embedding extraction) and stage 2 (full fine-tune step)."""
    import keras
    import tensorflow as tf

    from training.model import build_model

    keras.utils.set_random_seed(seed)
    model = build_model(size, "efficientnetb3", weights=None)
    x = tf.constant(np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3)).astype(np.float32))
    y = tf.constant(np.random.default_rng(seed + 1).integers(0, 2, (batch, 1)).astype(np.float32))
    embed = keras.Model(model.input, model.get_layer("gap").output)
    embed_fn = tf.function(lambda t: embed(t, training=False))
    stage1_ms = median_ms(lambda: embed_fn(x).numpy(), steps)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    stage2_ms = median_ms(lambda: model.train_on_batch(x, y), steps)
    return {
        "benchmark": "training",
        "cpu": cpu_name(),
        "cores": __import__("os").cpu_count(),
        "input_size": size,
        "batch": batch,
        "stage1_images_per_s": batch / (stage1_ms / 1000),
        "stage2_images_per_s": batch / (stage2_ms / 1000),
    }


def bench_multiworker(
    workers: tuple[int, ...] = (1, 2),
    size: int = 48,
    cells_per_subject: int = 80,
    epochs: int = 4,
    timeout: float = 600,
) -> dict:
    """`--strategy multiworker` on loopback, 1 worker then 2, in one run: the same SYNTHETIC set, model
    (smallcnn), batch per worker and epochs; images/s of the distributed fit as the chief's metrics.json
    records it (every worker's training images over the fit's seconds, validation included), and wall time."""
    import json
    import re
    import tempfile
    import time

    from training.distributed import free_loopback_ports, launch_loopback_worker
    from training.synth import write_cell_dataset

    repo = Path(__file__).resolve().parents[1]
    rows = []
    with tempfile.TemporaryDirectory(prefix="leukocam-bench-mw-") as tmp:
        root = Path(tmp)
        summary = write_cell_dataset(root / "cells", n_subjects=8, cells_per_subject=cells_per_subject, size=64, seed=3)
        for n in workers:
            run, ports = root / f"run{n}", free_loopback_ports(n)
            args = [str(root / "cells"), "--out", str(run), "--backbone", "smallcnn", "--input-size", str(size)]
            args += ["--weights", "none", "--um-per-px", str(summary["um_per_px"]), "--stages", "1"]
            args += ["--epochs", str(epochs), "--worker-timeout", "120"]
            logs = [root / f"run{n}-worker{i}.log" for i in range(n)]
            t0 = time.monotonic()
            procs = [launch_loopback_worker(ports, i, args, logs[i], repo, root) for i in range(n)]
            try:
                codes = [p.wait(timeout=timeout) for p in procs]
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
            wall = time.monotonic() - t0
            if codes != [0] * n:
                tail = logs[codes.index(next(c for c in codes if c != 0))].read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{n}-worker training failed (exit codes {codes}):\n{tail}")
            metrics = json.loads((run / "metrics.json").read_text())
            # Steady state: the chief's last epoch line ("... img/s on N replicas"), past the first epoch's tracing.
            epochs_seen = re.findall(r"([0-9.]+) img/s on \d+ replicas", logs[0].read_text(errors="replace"))
            rows.append(
                {
                    "workers": n,
                    "images_per_s": metrics["train_images_per_second"],
                    "last_epoch_images_per_s": float(epochs_seen[-1]) if epochs_seen else None,
                    "fit_s": metrics["train_seconds"],
                    "wall_s": round(wall, 1),
                    "epochs": metrics["epochs_run"],
                }
            )
    return {"size": size, "images": summary["n_images"], "rows": rows}


def training_markdown(r: dict) -> str:
    text = (
        f"### Training throughput: EfficientNetB3 at {r['input_size']} px, batch {r['batch']}; CPU: {r['cpu']} ({r['cores']} cores)\n\n"
        "| stage | images/s |\n| --- | --- |\n"
        f"| 1: frozen backbone, embeddings (computed once, then the head trains on them) | {r['stage1_images_per_s']:.1f} |\n"
        f"| 2: fine-tuning, full forward + backward | {r['stage2_images_per_s']:.1f} |\n"
    )
    mw = r.get("multiworker")
    if not mw:
        return text
    base = mw["rows"][0]["images_per_s"]
    text += (
        f"\n`--strategy multiworker` on loopback (smallcnn at {mw['size']} px, {mw['images']} SYNTHETIC cells, the same "
        "split, batch per worker and epochs; one process per worker, TF_CONFIG as on separate machines; the whole "
        "fit includes the first epoch's tracing and the validation passes, wall s the processes' start to exit):\n\n"
        "| workers | images/s, whole fit | vs 1 worker | images/s, last epoch | vs 1 worker | fit s | wall s |\n"
        "| --- | --- | --- | --- | --- | --- | --- |\n"
    )
    last = mw["rows"][0]["last_epoch_images_per_s"]
    for row in mw["rows"]:
        steady = row["last_epoch_images_per_s"]
        steady_cells = f"{steady:.0f} | {steady / last:.2f}×" if steady is not None and last else "not logged | –"
        text += (
            f"| {row['workers']} | {row['images_per_s']:.0f} | {row['images_per_s'] / base:.2f}× | {steady_cells} | "
            f"{row['fit_s']:.1f} | {row['wall_s']:.1f} |\n"
        )
    return text + (
        f"\nOne machine's {r['cores']} cores are shared by all the workers here, so the steady state (the last "
        "epoch) of 2 workers is not faster than 1: they split the same cores and add a gRPC all-reduce per step. "
        "On a set this small the whole fit is mostly the first epoch's tracing and the validation passes. The "
        "rows show that the path works; the gain needs separate machines (docs/training.md).\n"
    )
