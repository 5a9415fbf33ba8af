"""The classifier: an ImageNet-style backbone, global average pooling, dropout, one Dense logit.

The head must stay GAP -> (Dropout) -> Dense(1): for that head Grad-CAM equals
the class activation map computed from the Dense weights, which is what lets
the Pi produce heatmaps without gradients (docs/design.md). The model takes uint8
RGB values 0-255 as float; Keras EfficientNet rescales and normalizes inside
its own graph, so the data pipeline must not normalize.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np


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
    "efficientnetb5": keras.applications.EfficientNetB5,
    "resnet50": keras.applications.ResNet50,
    "inceptionv3": keras.applications.InceptionV3,
    "smallcnn": small_cnn,
}
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def input_preprocessing(backbone: str, x):
    """Each backbone's own preprocess_input as plain Keras layers inside the graph (the model takes 0-255 RGB).

    EfficientNet and smallcnn rescale inside their own graphs. InceptionV3 wants [-1, 1]. ResNet50 wants
    caffe style (BGR, ImageNet mean subtracted, no scaling): a frozen 1x1 convolution does the channel swap and
    the mean, built-in layers only, so model.keras loads without custom objects and converts to LiteRT.
    """
    if backbone == "inceptionv3":
        return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")(x)
    if backbone == "resnet50":
        conv = keras.layers.Conv2D(3, 1, name="preprocess", trainable=False)
        y = conv(x)
        swap = np.zeros((1, 1, 3, 3), dtype=np.float32)
        for i in range(3):
            swap[0, 0, 2 - i, i] = 1.0
        conv.set_weights([swap, -np.array(CAFFE_MEAN_BGR, dtype=np.float32)])
        return y
    return x


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


IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)


def match_imagenet_normalization(base: keras.Model) -> None:
    """Give an EfficientNet loaded from a local weights file the input scaling of weights="imagenet".

    Keras adds a compensating Rescaling(1/sqrt(stddev)) after the stem's Normalization only when
    `weights == "imagenet"` (keras/applications/efficientnet.py); a local *_notop.h5 would otherwise
    feed the pretrained features inputs about twice too large. Folding the same factor into the
    Normalization layer's variance (x - mean) / sqrt(var * stddev) gives the identical function
    with built-in layers only, so model.keras still loads without custom objects.
    """
    norm = next((layer for layer in base.layers if isinstance(layer, keras.layers.Normalization)), None)
    if norm is None:
        raise ValueError(f"{base.name}: no Normalization layer in the stem; cannot match ImageNet input scaling")
    mean, variance, *rest = norm.get_weights()
    norm.set_weights([mean, variance * np.asarray(IMAGENET_STDDEV_RGB, dtype=variance.dtype), *rest])
    norm.finalize_state()  # Normalization caches mean and variance as tensors; refresh them from the weights


def build_model(
    input_size: int,
    backbone: str = "efficientnetb3",
    weights: str | None = None,
    dropout: float = 0.3,
    bn_momentum: float | None = None,
) -> keras.Model:
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
    resolved = resolve_weights(weights)
    base = BACKBONES[backbone](include_top=False, weights=resolved, input_tensor=input_preprocessing(backbone, inp))
    if backbone.startswith("efficientnet") and resolved not in (None, "imagenet"):
        match_imagenet_normalization(base)
    if bn_momentum is not None:
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = bn_momentum
    x = keras.layers.GlobalAveragePooling2D(name=GAP_LAYER)(base.output)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    # float32 even under a mixed_float16 policy: the logit feeds the loss, the threshold and the CAM.
    logit = keras.layers.Dense(1, name=LOGIT_LAYER, dtype="float32")(x)
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


HEAD_LAYERS = (GAP_LAYER, "dropout", LOGIT_LAYER)


def embedding_model(model: keras.Model) -> keras.Model:
    """The model up to global average pooling (shared weights): the embedding the head sees."""
    return keras.Model(model.input, model.get_layer(GAP_LAYER).output)


def backbone_layers(model: keras.Model) -> list:
    return [
        layer
        for layer in model.layers
        if layer.name not in HEAD_LAYERS
        and layer.name != "preprocess"
        and not isinstance(layer, keras.layers.InputLayer)
    ]


def freeze_backbone(model: keras.Model) -> None:
    for layer in backbone_layers(model):
        layer.trainable = False


def unfreeze(model: keras.Model, top_layers: int = 20) -> int:
    """Make the top `top_layers` weighted backbone layers trainable, BatchNorm kept frozen; returns how many train.

    BatchNorm stays frozen (keras-io EfficientNet fine-tuning recipe): with small fine-tuning batches its
    statistics would drift away from the ones the head was trained on. BatchNorm layers are therefore not
    counted: `top_layers` is the number of layers that really train (convolutions, dense, ...).
    """
    layers = [layer for layer in backbone_layers(model) if layer.weights]
    for layer in layers:
        layer.trainable = False
    trainable = [layer for layer in layers if not isinstance(layer, keras.layers.BatchNormalization)]
    for layer in trainable[len(trainable) - top_layers :] if top_layers > 0 else []:
        layer.trainable = True
    return sum(layer.trainable for layer in layers)
