"""Keras model -> TFLite with named outputs: probability, logit and the CAM.

The export graph adds a 1x1 convolution that carries the Dense head's weights,
so CAM = sum_k w_k A_k comes out of the same interpreter call as the
probability (one extra output, no gradients on the Pi). Outputs are float
(dequantized in the graph). Modes:

- int8: full-integer, uint8 RGB 0-255 input; smallest and fastest on a Pi's
  CPU, but SE + swish EfficientNets can lose accuracy (measure it: verify.py);
- int8 with float layers ("selective"): the layers that QuantizationDebugger
  finds worst stay float; a little larger and slower, usually most of the
  accuracy back;
- dynamic: dynamic-range quantization, int8 weights with float activations
  (no calibration; float input and outputs): near-lossless, about the int8
  size, slower than int8 (the activations are quantized on the fly);
- int16x8: 16-bit activations, 8-bit weights; float input; more faithful, slow
  kernels on ARM;
- float16: weights in float16 (half the float32 size), float compute;
- float32: the reference; four times the int8 size.
"""

from __future__ import annotations

import contextlib
import csv
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

SIGNATURE = "serving_default"
QUANT_MODES = ("int8", "dynamic", "int16x8", "float16", "float32")


def export_model(model):
    """Wrap a trained GAP+Dense model into one returning {probability, logit, cam}."""
    import keras

    from training.model import GAP_LAYER, head_weights

    fmap = model.get_layer(GAP_LAYER).input
    kernel, _ = head_weights(model)
    cam_layer = keras.layers.Conv2D(1, 1, use_bias=False, name="cam")
    cam = cam_layer(fmap)
    cam_layer.set_weights([kernel.reshape(1, 1, -1, 1)])
    prob = keras.layers.Activation("sigmoid", name="probability")(model.output)
    return keras.Model(model.input, {"probability": prob, "logit": model.output, "cam": cam}, name="leukocam_export")


def float_outputs(model, images: np.ndarray, batch_size: int = 16) -> dict[str, np.ndarray]:
    """The float Keras model's outputs for uint8 crops, in the same layout the device reads."""
    exp = export_model(model)
    out = {"probability": [], "logit": [], "cam": []}
    for i in range(0, len(images), batch_size):
        res = exp(images[i : i + batch_size].astype(np.float32), training=False)
        for k in out:
            out[k].append(np.asarray(res[k]))
    return {
        "probability": np.concatenate(out["probability"])[:, 0],
        "logit": np.concatenate(out["logit"])[:, 0],
        "cam": np.concatenate(out["cam"])[..., 0],
    }


@contextlib.contextmanager
def converter_for(model, calibration: np.ndarray, mode: str) -> Iterator:
    """A configured TFLiteConverter over a temporary SavedModel of the export graph."""
    import keras
    import tensorflow as tf

    if mode not in QUANT_MODES:
        raise ValueError(f"quantization mode {mode!r}: choose one of {', '.join(QUANT_MODES)}")
    size = model.input_shape[1]
    exp = export_model(model)
    with tempfile.TemporaryDirectory() as tmp:
        archive = keras.export.ExportArchive()
        archive.track(exp)
        archive.add_endpoint(
            SIGNATURE,
            lambda image: exp(image, training=False),
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="image")],
        )
        archive.write_out(str(Path(tmp) / "saved"), verbose=False)
        conv = tf.lite.TFLiteConverter.from_saved_model(str(Path(tmp) / "saved"), signature_keys=[SIGNATURE])
        if mode in ("int8", "int16x8"):
            if len(calibration) == 0:
                raise ValueError(f"{mode} conversion needs calibration crops")
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = lambda: _representative(calibration)
        if mode == "int8":
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = tf.uint8
        elif mode == "int16x8":
            conv.target_spec.supported_ops = [
                tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
            ]
        elif mode == "dynamic":  # int8 weights, float activations: no representative dataset
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
        elif mode == "float16":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.target_spec.supported_types = [tf.float16]
        yield conv


def convert(model, calibration: np.ndarray, mode: str = "int8", float_layers: list[str] | None = None) -> bytes:
    """Convert to a TFLite flatbuffer.

    Args:
        model: trained Keras model from training.model.build_model.
        calibration: uint8 crops N x S x S x 3 for calibration (stratified by class).
        mode: one of QUANT_MODES.
        float_layers: int8 only: tensor names to keep in float (selective quantization).
    """
    import tensorflow as tf

    with converter_for(model, calibration, mode) as conv:
        if not float_layers:
            return conv.convert()
        if mode != "int8":
            raise ValueError("float_layers (selective quantization) applies to int8 only")
        # The debugger re-converts with the denylisted nodes left in float.
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(float_layers))
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=conv, debug_dataset=lambda: _debug_samples(calibration), debug_options=options
        )
        return debugger.get_nondebug_quantized_model()


def layer_errors(model, calibration: np.ndarray, samples: int = 32) -> list[dict]:
    """Per-tensor int8 quantization error from QuantizationDebugger, worst first.

    Each row has the tensor name, op and rmse/scale: the root-mean-square
    difference between float and dequantized values in units of the tensor's
    quantization step (about 0.29 is the floor for pure rounding error; far
    above 1 means the int8 range fits that layer badly).
    """
    import tensorflow as tf

    subset = calibration[: max(1, samples)]
    with converter_for(model, subset, "int8") as conv:
        conv.inference_input_type = tf.float32  # the debugger feeds float samples
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=conv, debug_dataset=lambda: _debug_samples(subset)
        )
        debugger.run()
        buf = io.StringIO()
        debugger.layer_statistics_dump(buf)
    rows = []
    for row in csv.DictReader(io.StringIO(buf.getvalue())):
        try:
            scale = float(row["scale"])
            mse = float(row["mean_squared_error"])
        except (KeyError, ValueError):
            continue
        if scale > 0 and np.isfinite(mse):
            rows.append(
                {
                    "tensor": row.get("tensor_name", ""),
                    "op": row.get("op_name", ""),
                    "rmse_per_scale": float(np.sqrt(mse) / scale),
                    "max_abs_error": float(row.get("max_abs_error", "nan")),
                }
            )
    rows.sort(key=lambda r: -r["rmse_per_scale"])
    return rows


def _representative(calibration: np.ndarray) -> Iterator[dict]:
    # Pin the input range to the full 0-255 so the uint8 input maps 1:1 onto pixel values.
    edge = np.zeros((1, *calibration.shape[1:]), dtype=np.float32)
    edge[0, 0, 0] = 255.0
    yield {"image": edge}
    for crop in calibration:
        yield {"image": crop[None].astype(np.float32)}


def _debug_samples(calibration: np.ndarray) -> Iterator[list[np.ndarray]]:
    for crop in calibration:
        yield [crop[None].astype(np.float32)]
