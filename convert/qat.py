"""Quantization-aware fine-tuning for full int8, written for Keras 3 (no tensorflow-model-optimization).

Post-training int8 rounds every activation tensor to 256 levels of one
per-tensor range. An EfficientNet (swish, squeeze-and-excitation gates,
depthwise convolutions) collects that rounding over some 250 tensors, and a
model whose logits were never asked to tolerate it can move by one or two
logits: enough to flip the cells near the threshold.

Quantization-aware training (Jacob et al., CVPR 2018) lets the weights adapt
to the rounding: the forward pass rounds each activation the way the int8
kernels will, the backward pass lets the gradient through the rounding
(straight-through estimator). tensorflow-model-optimization's QAT needs Keras
2, so this module does the same with Keras 3's own tools:

- `keras.models.clone_model(call_function=...)` rebuilds the graph with an
  `ActivationFakeQuant` after every tensor TFLite keeps in int8 (the outputs
  of batch norm, activations, adds, multiplies, pooling, input scaling and the
  logit), around the layers of a copy of the model (the student), so
  training the fake-quantized graph trains the student; the trained model
  itself is never changed;
- each tensor's range is its minimum and maximum over the calibration crops,
  as the converter's calibrator takes it, measured again before every pass
  over the data; the grid is asymmetric 8-bit with an exact zero (TFLite's
  activation scheme); batch norm is frozen (its moving statistics are what
  the converter folds into the convolutions);
- the target is the float model itself (distillation): the student learns to
  give, through the rounding, the teacher's answer at the operating threshold
  (binary cross-entropy between the two probabilities measured from the
  threshold logit, which weighs the cells near the threshold most), plus a
  small squared logit term that keeps the rest of the logit scale and the
  heatmap in place. No label is used, so the student is taught to agree with
  the model that was trained and reported, not to become another model.

Weights are not fake-quantized: TFLite quantizes them per channel after
folding batch norm, which costs little next to the activations.

The simulation is close to the converter's arithmetic, not equal to it, and
part of what remains can show as an offset of the logit near the threshold
(on the demo model it was small: 0.16 logits). So the last step converts the student once, measures the median offset of its int8 logit
from the float model's on the fine-tuning crops near the threshold, and takes
it out of the logit's bias (`correct_logit_bias`; bias correction in the
sense of Nagel et al., ICCV 2019, applied to the output).

After fine-tuning, the plain graph (no fake-quant layers) is converted by the
usual post-training int8 path, calibrated on the same crops; the gate then
compares it against the original float model, as for any other mode.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

LEVELS = 255.0
"""Steps of an 8-bit tensor (256 levels)."""


@dataclass(frozen=True)
class FineTuneOptions:
    """How the int8 fine-tuning runs (`leukocam convert --qat-*`)."""

    epochs: int = 6
    """Passes over the fine-tuning crops, each crop in one random rotation or mirror image per pass."""
    learning_rate: float = 1e-4
    """Adam's starting rate (cosine decay to 0): small, the model only has to learn the rounding."""
    max_crops: int = 2000
    """Train-split crops used (stratified by class); the teacher's logits are computed for each."""
    batch_size: int = 32
    logit_weight: float = 0.02
    """Weight of the squared logit difference beside the cross-entropy at the threshold."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"fine-tuning epochs must be at least 1, got {self.epochs}")
        if not self.learning_rate > 0:
            raise ValueError(f"fine-tuning learning rate must be positive, got {self.learning_rate}")
        if self.max_crops < 2 or self.batch_size < 1:
            raise ValueError("fine-tuning needs at least 2 crops and a batch size of at least 1")


def fake_quant_class():
    """The ActivationFakeQuant Keras layer class (defined on first use: importing this module needs no Keras)."""
    import keras

    class ActivationFakeQuant(keras.layers.Layer):
        """Rounds a tensor to the int8 grid of its range (forward); passes the gradient inside the range and
        stops it outside (backward): the straight-through estimator.

        The range is what the TFLite converter will calibrate: the minimum and maximum over the calibration
        crops, seen while `observing` is set (and always including 0); it stays fixed while the weights
        train, so the rounding the student learns to live with is the rounding the converter applies.
        """

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.observing = False

        def build(self, input_shape):
            self.low = self.add_weight(shape=(), initializer="zeros", trainable=False, name="low")
            self.high = self.add_weight(shape=(), initializer="zeros", trainable=False, name="high")

        def call(self, x, training=None):
            from keras import ops

            if self.observing:  # eager calibration pass: the running extremes, as the converter's calibrator
                self.low.assign(ops.minimum(self.low, ops.min(x)))
                self.high.assign(ops.maximum(self.high, ops.max(x)))
            low = ops.minimum(self.low, 0.0)
            high = ops.maximum(self.high, low + 1e-6)
            scale = (high - low) / LEVELS
            zero = ops.round(-low / scale)  # zero is exact, as in TFLite's asymmetric int8
            clipped = ops.clip(x, -zero * scale, (LEVELS - zero) * scale)
            return clipped + ops.stop_gradient(ops.round(clipped / scale) * scale - clipped)

    return ActivationFakeQuant


def quantization_aware(model):
    """(student, fake-quantized graph): a copy of `model` with its batch norm frozen, and the same layers with
    an ActivationFakeQuant after every tensor TFLite keeps in int8. Training the second trains the first;
    `model` itself is never changed. Dropout is left out (the student must follow the teacher exactly)."""
    import keras

    fake_quant = fake_quant_class()
    student = keras.models.clone_model(model)
    student.set_weights(model.get_weights())
    # Layers whose output is a tensor of its own in the int8 graph. Convolutions without an activation are
    # not: TFLite folds the batch norm after them (or the bias) into the same op. Padding, reshapes and max
    # pooling keep their input's scale, so they need no rounding of their own.
    quantized = (
        keras.layers.BatchNormalization,
        keras.layers.Activation,
        keras.layers.ReLU,
        keras.layers.Add,
        keras.layers.Subtract,
        keras.layers.Multiply,
        keras.layers.Concatenate,
        keras.layers.GlobalAveragePooling2D,
        keras.layers.AveragePooling2D,
        keras.layers.Rescaling,
        keras.layers.Normalization,
        keras.layers.Dense,
    )
    for layer in student.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False  # inference mode: the moving statistics, as folded by the converter
    points = []

    def call(layer, *args, **kwargs):
        if isinstance(layer, keras.layers.Dropout):
            return args[0]
        out = layer(*args, **kwargs)
        activated = isinstance(layer, keras.layers.Conv2D) and layer.activation is not keras.activations.linear
        if isinstance(layer, quantized) or activated:
            points.append(layer.name)
            return fake_quant(name=f"fake_quant_{layer.name}")(out)
        return out

    graph = keras.models.clone_model(student, clone_function=lambda layer: layer, call_function=call)
    if not points:
        raise ValueError("the model has no layer whose output int8 would quantize; nothing to fine-tune")
    return student, graph


def observe_ranges(graph, crops: np.ndarray, batch_size: int = 32) -> None:
    """Set every fake-quant range to the extremes its tensor takes on `crops` (uint8), as TFLite calibrates;
    the full 0-255 input range is always included, as `convert.tflite` pins it."""
    layers = [layer for layer in graph.layers if layer.name.startswith("fake_quant_")]
    for layer in layers:
        layer.low.assign(0.0)
        layer.high.assign(0.0)
        layer.observing = True
    try:
        edge = np.zeros((1, *crops.shape[1:]), np.float32)
        edge[0, 0, 0] = 255.0
        graph(edge, training=False)
        for i in range(0, len(crops), batch_size):
            graph(crops[i : i + batch_size].astype(np.float32), training=False)
    finally:
        for layer in layers:
            layer.observing = False


def dihedral(crops: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Each crop i turned by k[i] quarter turns, mirrored when k[i] >= 4 (the 8 symmetries of a square)."""
    out = np.empty_like(crops)
    for i, (crop, t) in enumerate(zip(crops, k, strict=True)):
        c = np.rot90(crop, int(t) % 4)
        out[i] = c[:, ::-1] if t >= 4 else c
    return out


def fine_tune_for_int8(
    model,
    crops: np.ndarray,
    threshold: float,
    calibration: np.ndarray,
    options: FineTuneOptions | None = None,
    progress: Callable[[str], None] | None = None,
):
    """Fine-tune a copy of `model` on uint8 crops (N x S x S x 3, from the train split; convert picks at most
    `options.max_crops`, stratified by class) to keep its float answers through int8 rounding; returns
    (student model, record for model.json).

    `threshold` is the operating probability; the distillation is centred on its logit. `calibration` are the
    crops the converter will calibrate on afterwards: the fake-quant ranges are taken from them.
    """
    import keras
    from keras import ops
    from tqdm import tqdm

    opts = options or FineTuneOptions()
    say = progress or (lambda message: None)
    rng = np.random.default_rng(opts.seed)
    if len(crops) < 2:
        raise ValueError("int8 fine-tuning needs at least 2 train-split crops")
    t0 = time.perf_counter()
    # The teacher's logit for every crop in each of its 8 symmetries: the augmentation changes the crop, and
    # the target must be the float model's answer on the crop the student sees.
    teacher = np.stack(
        [
            model.predict(dihedral(crops, np.full(len(crops), k)).astype(np.float32), batch_size=64, verbose=0)[:, 0]
            for k in tqdm(range(8), desc="int8 fine-tuning: teacher logits", unit="symmetry", leave=False)
        ],
        axis=1,
    ).astype(np.float32)
    student, graph = quantization_aware(model)
    centre = float(np.log(threshold / (1.0 - threshold)))
    weight = opts.logit_weight

    def loss(target, logit):
        return ops.mean(
            ops.binary_crossentropy(ops.sigmoid(target - centre), logit - centre, from_logits=True)
        ) + weight * ops.mean(ops.square(logit - target))

    batches = int(np.ceil(len(crops) / opts.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(opts.learning_rate, opts.epochs * batches)
    graph.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss)
    ranges_from = calibration if len(calibration) else crops
    losses = []
    bar = tqdm(total=opts.epochs * batches, desc="int8 fine-tuning", unit="batch", leave=False)
    try:
        for epoch in range(opts.epochs):
            # Each pass rounds with the ranges the converter would calibrate on the weights as they are now.
            observe_ranges(graph, ranges_from)
            order = rng.permutation(len(crops))
            turns = rng.integers(0, 8, len(crops))
            total = 0.0
            for b in range(batches):
                pick = order[b * opts.batch_size : (b + 1) * opts.batch_size]
                x = dihedral(crops[pick], turns[pick]).astype(np.float32)
                y = teacher[pick, turns[pick]][:, None]
                total += float(graph.train_on_batch(x, y)) * len(pick)
                bar.update(1)
            losses.append(total / len(crops))
            say(f"  int8 fine-tuning: epoch {epoch + 1}/{opts.epochs}, loss {losses[-1]:.4f}")
    finally:
        bar.close()
    shift, near = correct_logit_bias(student, crops, teacher[:, 0], centre, calibration if len(calibration) else crops)
    say(f"  int8 fine-tuning: the int8 logit sat {shift:+.3f} from the float one near the threshold; corrected")
    record = {
        **asdict(opts),
        "method": "quantization-aware fine-tuning: activation fake-quant, distilled from the float model",
        "crops": int(len(crops)),
        "fake_quant_tensors": sum(1 for layer in graph.layers if layer.name.startswith("fake_quant_")),
        "loss_per_epoch": [round(v, 5) for v in losses],
        "logit_bias_correction": round(-shift, 5),
        "bias_measured_on": near,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return student, record


NEAR_THRESHOLD = 2.0
"""Logits either side of the threshold's over which the int8 model's remaining offset is measured."""


def correct_logit_bias(student, crops: np.ndarray, teacher: np.ndarray, centre: float, calibration: np.ndarray):
    """Convert the student to int8 as convert will, measure the median offset of its logit from the float
    model's on the fine-tuning crops whose float logit lies within NEAR_THRESHOLD of the threshold's (all of
    them when fewer than 20 do), and take that offset out of the logit's bias. Returns (offset, how many crops
    it was measured on).

    The simulated rounding is close to the converter's, not equal to it (the sigmoid inside swish, integer
    multipliers, per-channel weights), and what remains of the difference shows as an offset of the logit.
    Only train-split crops are used: the gate's own crops never set it.
    """
    from convert.tflite import convert
    from device.runtime import interpreter_class
    from training.model import LOGIT_LAYER

    interpreter = interpreter_class()[0](model_content=convert(student, calibration, "int8"), num_threads=2)
    runner = interpreter.get_signature_runner("serving_default")
    int8 = np.array([float(np.asarray(runner(image=c[None])["logit"]).ravel()[0]) for c in crops])
    near = np.abs(teacher - centre) < NEAR_THRESHOLD
    if near.sum() < 20:
        near = np.ones(len(crops), bool)
    shift = float(np.median(int8[near] - teacher[near]))
    layer = student.get_layer(LOGIT_LAYER)
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel, bias - np.float32(shift)])
    return shift, int(near.sum())
