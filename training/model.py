"""The classifier: an ImageNet-style backbone, global average pooling, dropout, one Dense logit.

The head must stay GAP -> (Dropout) -> Dense(1): for that head Grad-CAM equals
the class activation map computed from the Dense weights, which is what lets
the Pi produce heatmaps without gradients (DESIGN.md). The model takes uint8
RGB values 0-255 as float; Keras EfficientNet rescales and normalizes inside
its own graph, so the data pipeline must not normalize.
"""

from __future__ import annotations

from pathlib import Path

import keras


def small_cnn(include_top: bool = False, weights=None, input_tensor=None):
    """A three-block CNN for smoke tests and quick experiments; learns in seconds, never pretrained."""
    if include_top or weights is not None:
        raise ValueError("smallcnn has no top and no pretrained weights: use --weights none")
    x = keras.layers.Rescaling(1.0 / 255)(input_tensor)
    for i, filters in enumerate((16, 32, 64)):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{i}")(x) if i < 2 else x
    return keras.Model(input_tensor, x, name="smallcnn")


BACKBONES = {
    "efficientnetb3": keras.applications.EfficientNetB3,
    "efficientnetb0": keras.applications.EfficientNetB0,
    "smallcnn": small_cnn,
}
GAP_LAYER = "gap"
LOGIT_LAYER = "logit"


def resolve_weights(weights: str | None) -> str | None:
    """'imagenet' (Keras download and cache), None/'none' (random init), or a local weights file."""
    if weights is None or str(weights).lower() == "none":
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} not found; pass --weights imagenet, none, or the path of a local "
            "*_notop.h5 weights file (e.g. efficientnetb3_notop.h5 from Keras' cache ~/.keras/models)"
        )
    return str(path)


def build_model(input_size: int, backbone: str = "efficientnetb3", weights: str | None = None,
                dropout: float = 0.3, bn_momentum: float | None = None) -> keras.Model:
    """Build backbone + GAP + Dropout + Dense(1) returning the pre-activation logit.

    Args:
        input_size: square input side in pixels.
        backbone: a key of BACKBONES.
        weights: see resolve_weights.
        dropout: dropout rate before the Dense layer.
        bn_momentum: override BatchNorm momentum (lower, e.g. 0.9, helps short from-scratch runs
            whose moving statistics otherwise lag far behind the weights).
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
    inp = keras.Input((input_size, input_size, 3), name="image")
    base = BACKBONES[backbone](include_top=False, weights=resolve_weights(weights), input_tensor=inp)
    if bn_momentum is not None:
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = bn_momentum
    x = keras.layers.GlobalAveragePooling2D(name=GAP_LAYER)(base.output)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    logit = keras.layers.Dense(1, name=LOGIT_LAYER)(x)
    return keras.Model(inp, logit, name=f"leukocam_{backbone}")


def feature_model(model: keras.Model) -> keras.Model:
    """A model returning (logit, last feature map) with shared weights."""
    fmap = model.get_layer(GAP_LAYER).input
    return keras.Model(model.input, [model.output, fmap])


def head_weights(model: keras.Model):
    """(kernel K x 1, bias 1) of the Dense head as numpy arrays."""
    kernel, bias = model.get_layer(LOGIT_LAYER).get_weights()
    return kernel, bias


def feature_layer_name(model: keras.Model) -> str:
    """Name of the layer whose output is the CAM's feature map."""
    return model.get_layer(GAP_LAYER).input._keras_history.operation.name
