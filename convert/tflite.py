"""Keras model -> TFLite with named outputs: probability, logit and the CAM.

The export graph adds a 1x1 convolution that carries the Dense head's weights,
so CAM = sum_k w_k A_k comes out of the same interpreter call as the
probability (one extra output, no gradients on the Pi). Input is uint8 RGB
0-255 in full-integer mode; outputs are float (dequantized in the graph).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

SIGNATURE = "serving_default"
QUANT_MODES = ("int8", "float32")


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


def convert(model, calibration: np.ndarray, mode: str = "int8") -> bytes:
    """Convert to a TFLite flatbuffer.

    Args:
        model: trained Keras model from training.model.build_model.
        calibration: uint8 crops N x S x S x 3 for int8 calibration (stratified by class).
        mode: "int8" (full-integer, uint8 input) or "float32".
    """
    import keras
    import tensorflow as tf

    if mode not in QUANT_MODES:
        raise ValueError(f"quantization mode {mode!r}: choose one of {QUANT_MODES}")
    size = model.input_shape[1]
    exp = export_model(model)
    with tempfile.TemporaryDirectory() as tmp:
        archive = keras.export.ExportArchive()
        archive.track(exp)
        archive.add_endpoint(SIGNATURE, lambda image: exp(image, training=False),
                             input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="image")])
        archive.write_out(str(Path(tmp) / "saved"), verbose=False)
        conv = tf.lite.TFLiteConverter.from_saved_model(str(Path(tmp) / "saved"), signature_keys=[SIGNATURE])
        if mode == "int8":
            if len(calibration) == 0:
                raise ValueError("int8 conversion needs calibration crops")
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = lambda: _representative(calibration)
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = tf.uint8
        return conv.convert()


def _representative(calibration: np.ndarray) -> Iterator[dict]:
    # Pin the input range to the full 0-255 so the uint8 input maps 1:1 onto pixel values.
    edge = np.zeros((1, *calibration.shape[1:]), dtype=np.float32)
    edge[0, 0, 0] = 255.0
    yield {"image": edge}
    for crop in calibration:
        yield {"image": crop[None].astype(np.float32)}
