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

- first, each batch norm's output is clipped at a high quantile of its values
  on the calibration crops (`clip_activations`), so that int8's per-tensor
  range is set by the tensor's bulk, not by its rarest outliers; the clip is a
  TensorFlow fake-quant op, which the converter turns into the range of the
  convolution before it and removes;
- `keras.models.clone_model(call_function=...)` rebuilds the graph with an
  `ActivationFakeQuant` after every tensor TFLite keeps in int8 (the outputs
  of batch norm, unless clipped (the clip rounds them, on its fixed range),
  activations, adds, multiplies, pooling, input scaling and the logit),
  around the layers of a copy of the model (the student), so
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
(on the demo model it was small: 0.16 logits before the clip, 0.02 with it). So the last step converts the student once, measures the median offset of its int8 logit
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
    clip_quantile: float = 0.9999
    """Each batch-norm output is clipped at this quantile of its values (and 1 - it) on the calibration crops
    before fine-tuning, so that int8's per-tensor range is set by the tensor's bulk, not by its rarest
    outliers (see `clip_activations`); 1 clips nothing."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"fine-tuning epochs must be at least 1, got {self.epochs}")
        if not self.learning_rate > 0:
            raise ValueError(f"fine-tuning learning rate must be positive, got {self.learning_rate}")
        if not 0.99 <= self.clip_quantile <= 1.0:
            raise ValueError(f"the clipping quantile must lie in [0.99, 1] (1: no clipping), got {self.clip_quantile}")
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


CLIP_PREFIX = "activation_clip_"
"""Name of the clip `clip_activations` puts after a batch norm: the prefix, then the batch norm's name."""


def clip_class():
    """The ActivationClip Keras layer class (defined once, on first use: importing this module needs no Keras)."""
    global _ACTIVATION_CLIP
    if _ACTIVATION_CLIP is not None:
        return _ACTIVATION_CLIP
    import keras

    class ActivationClip(keras.layers.Layer):
        """Clips a tensor to [low, high] and rounds it to the 256 levels of that range (exact zero), with the
        straight-through gradient inside it: TensorFlow's FakeQuantWithMinMaxArgs. The TFLite converter reads
        the range off the op and removes it, so the int8 model has no op of its own here: the convolution
        before it (batch norm folded in) is quantized on [low, high] instead of its calibration extremes."""

        def __init__(self, low: float, high: float, **kwargs):
            super().__init__(**kwargs)
            self.low, self.high = float(low), float(high)

        def call(self, x):
            import tensorflow as tf

            return tf.quantization.fake_quant_with_min_max_args(x, min=self.low, max=self.high, num_bits=8)

        def get_config(self):
            return {**super().get_config(), "low": self.low, "high": self.high}

    _ACTIVATION_CLIP = ActivationClip
    return ActivationClip


_ACTIVATION_CLIP = None


def activation_bounds(model, crops: np.ndarray, quantile: float, batch_size: int = 4, seed: int = 0) -> dict:
    """{batch-norm layer name: (low, high)}: the (1 - quantile) and quantile points of each batch norm's
    output over uint8 `crops` (from a random subsample of at most 20,000 values per batch and tensor)."""
    import keras

    norms = [layer.name for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not norms:
        return {}
    probe = keras.Model(model.input, [model.get_layer(name).output for name in norms])
    rng = np.random.default_rng(seed)
    seen: dict[str, list[np.ndarray]] = {name: [] for name in norms}
    for i in range(0, len(crops), batch_size):
        outs = probe(crops[i : i + batch_size].astype(np.float32), training=False)
        for name, out in zip(norms, outs if isinstance(outs, list | tuple) else [outs], strict=True):
            values = np.asarray(out).ravel()
            seen[name].append(values if values.size <= 20_000 else rng.choice(values, 20_000, replace=False))
    bounds = {}
    for name, parts in seen.items():
        values = np.concatenate(parts)
        bounds[name] = (float(np.quantile(values, 1.0 - quantile)), float(np.quantile(values, quantile)))
    return bounds


def clip_activations(model, crops: np.ndarray, quantile: float):
    """(a copy of `model` with an ActivationClip after every batch norm, the number of clips).

    TFLite's int8 calibration takes each tensor's range from its minimum and maximum over the calibration
    crops. In an EfficientNet trained from scratch, a batch norm's few most extreme values lie well
    beyond its bulk (on the demo model, the 0.9999 quantile is about two thirds of the extreme), so one outlier
    coarsens the int8 step of every value. Clipping each batch norm's output at a high quantile of its
    values on the calibration crops (percentile calibration, as in PACT, Choi et al. 2018, with fixed
    bounds) makes the range the bulk's. The clip is part of the model, so the float answers change a
    little too; fine-tuning then teaches the clipped student the original model's answers.
    `quantile` 1 returns the model unchanged.
    """
    import keras

    if quantile >= 1.0:
        return model, 0
    bounds = activation_bounds(model, crops, quantile)
    clip = clip_class()

    def call(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        if layer.name in bounds:
            low, high = min(bounds[layer.name][0], 0.0), max(bounds[layer.name][1], 0.0)
            return clip(low, max(high, low + 1e-6), name=CLIP_PREFIX + layer.name)(out)  # min < max, always
        return out

    clipped = keras.models.clone_model(model, call_function=call)
    copy_weights(model, clipped)
    return clipped, len(bounds)


def copy_weights(source, target) -> None:
    """Copy every weighted layer's weights from `source` to the layer of the same name in `target` (a clone),
    then let layers that cache their weights (Normalization keeps its mean and variance as tensors, built
    from the config's defaults when cloned) rebuild that state; layers `source` lacks (clips) are skipped."""
    names = {layer.name for layer in source.layers}
    for layer in target.layers:
        if layer.weights and layer.name in names:
            layer.set_weights(source.get_layer(layer.name).get_weights())
            if hasattr(layer, "finalize_state"):
                layer.finalize_state()


def quantization_aware(model):
    """(student, fake-quantized graph): a copy of `model` with its batch norm frozen, and the same layers with
    an ActivationFakeQuant after every tensor TFLite keeps in int8. Training the second trains the first;
    `model` itself is never changed. Dropout is left out (the student must follow the teacher exactly).
    A batch norm followed by an ActivationClip (`clip_activations`) is rounded by the clip, on its range, as the
    converter does."""
    import keras

    fake_quant = fake_quant_class()
    student = keras.models.clone_model(model)
    copy_weights(model, student)
    clipped = {layer.name[len(CLIP_PREFIX) :] for layer in student.layers if layer.name.startswith(CLIP_PREFIX)}
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
        if layer.name in clipped or layer.name.startswith(CLIP_PREFIX):
            return out  # the clip after this batch norm rounds it, on its own range
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
    crops the converter will calibrate on afterwards: the clips' bounds (once) and the fake-quant ranges (before
    every pass) are taken from them.
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
    ranges_from = calibration if len(calibration) else crops
    clipped, clips = clip_activations(model, ranges_from, opts.clip_quantile)
    say(f"  int8 fine-tuning: {clips} batch-norm outputs clipped at their {opts.clip_quantile} quantile")
    student, graph = quantization_aware(clipped)
    centre = float(np.log(threshold / (1.0 - threshold)))
    weight = opts.logit_weight

    def loss(target, logit):
        return ops.mean(
            ops.binary_crossentropy(ops.sigmoid(target - centre), logit - centre, from_logits=True)
        ) + weight * ops.mean(ops.square(logit - target))

    batches = int(np.ceil(len(crops) / opts.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(opts.learning_rate, opts.epochs * batches)
    graph.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss)
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
    shift, near = correct_logit_bias(student, crops, teacher[:, 0], centre, ranges_from)
    say(f"  int8 fine-tuning: the int8 logit sat {shift:+.3f} from the float one near the threshold; corrected")
    record = {
        **asdict(opts),
        "method": "quantization-aware fine-tuning: batch-norm outputs clipped at a quantile, activation "
        "fake-quant, distilled from the float model",
        "crops": int(len(crops)),
        "clipped_tensors": clips,
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
