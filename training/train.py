"""Training on a folder dataset: subject-grouped split, augmentation, balancing, one or two stages, evaluation.

Two stages (`stages=2`): stage 1 freezes the backbone, computes the embeddings
(GAP outputs) once and trains the Dense head on them, with SMOTE or random
oversampling there when asked; its weights are copied into the full model.
Stage 2 fine-tunes the top backbone layers at a low learning rate with
BatchNorm frozen and class weights. Both stages stop early on validation loss
and keep the best weights. After training, a temperature is fitted on the
validation logits, and the threshold (target sensitivity) and review band are
chosen on validation; the held-out test split is only used to report.

Writes a run folder: `model.keras`, `training.json` (everything `convert` needs:
the preprocessing contract, the threshold and review band, the split by
subject, the data summary, seed and versions) and `metrics.json`, plus a
training-curve plot.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device.preprocess import PreprocessContract
from training.datasets import (
    LABELS,
    DatasetError,
    largest_side,
    load_images,
    read_dataset,
    split_by_subject,
    subject_groups,
    subject_warning,
    summarize,
    write_folds_csv,
)
from training.metrics import binary_metrics, ece, fit_temperature, nll, operating_point


@dataclass(frozen=True)
class TrainOptions:
    input_size: int = 300
    """Model input side in pixels (the paper used 300)."""
    um_per_px: float | None = None
    """Pixel size of the training images in micrometres (C-NMC: about 0.045, see docs/scale.md). It makes the
    bundle crop cells at the trained scale on the device (crop_um = largest image side x um_per_px); None
    leaves the scale unknown and the device scales each cell's box to the input (the size cue is lost)."""
    epochs: int = 20
    """Maximum epochs (the paper's default); early stopping on validation loss may end sooner."""
    batch_size: int = 16
    learning_rate: float = 1e-3
    backbone: str = "efficientnetb3"
    weights: str | None = "imagenet"
    """"imagenet", "none", or a local weights file."""
    dropout: float = 0.3
    bn_momentum: float | None = None
    """BatchNorm momentum override; 0.9 helps short from-scratch runs (see docs/design.md, known traps)."""
    test_fraction: float = 0.3
    val_fraction: float = 0.15
    patience: int = 8
    """Early-stopping patience in epochs (validation loss)."""
    seed: int = 0
    threshold: float = 0.5
    review_band: tuple[float, float] = (0.3, 0.7)
    augment: bool = True
    deterministic: bool = True
    """Same seed, same model: seeded stateless augmentation plus TensorFlow's deterministic kernels (a little
    slower; turn off for speed on a GPU where an op has no deterministic kernel)."""
    color_jitter: bool = True
    """Stain/colour jitter (brightness, contrast, saturation, small hue) on top of rotation/flip/zoom."""
    stages: int = 1
    """1: train everything at once; 2: head on cached embeddings, then fine-tune the top layers."""
    balance: str = "class-weight"
    """smote | oversample | class-weight | none. SMOTE/oversample act on embeddings (stage 1) or images (stages=1:
    oversample only); class weights are used for every image-level fit unless balance is "none"."""
    head_epochs: int = 100
    """Stage 1 maximum epochs (embeddings are cached, so these are cheap)."""
    fine_tune_layers: int = 20
    fine_tune_lr: float = 1e-5
    target_sensitivity: float | None = 0.95
    """Choose the threshold on validation for this sensitivity; None keeps `threshold` and `review_band`."""
    band_level: float = 0.99
    """Review band = [threshold at this sensitivity, threshold at this specificity] on validation."""
    strategy: str = "default"
    """default | mirrored | multiworker (tf.distribute)."""
    mixed_precision: bool = False
    """mixed_float16, only applied when a GPU is present."""
    report: bool = True
    """Write report.md and the plots (ROC, confusion matrix, reliability, Grad-CAM grid)."""


def augment_one(image, seed, jitter: bool):
    """Rotation, flips and zoom as in the paper, and stain/colour jitter, on one float 0-255 RGB image.

    Every random draw is a stateless op keyed by `seed` (a [2] int tensor given to each element), so the
    same seed gives the same augmented image in any thread order: training is reproducible. Rotation and
    zoom are one projective transform about the centre, filled with black like the C-NMC background;
    the jitter leaves the black background black.
    """
    import math

    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(seed, 8)
    x = tf.image.stateless_random_flip_left_right(image, seeds[0])
    x = tf.image.stateless_random_flip_up_down(x, seeds[1])
    angle = tf.random.stateless_uniform([], seeds[2], -math.pi, math.pi)
    zoom = tf.random.stateless_uniform([], seeds[3], 0.9, 1.1)  # > 1 enlarges the cell
    h, w = tf.cast(tf.shape(x)[0], tf.float32), tf.cast(tf.shape(x)[1], tf.float32)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    # Output pixel (u, v) samples input (a0 u + a1 v + a2, b0 u + b1 v + b2): rotate and scale about the centre.
    transform = tf.stack([cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])
    x = tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None],
        transforms=transform[None],
        output_shape=tf.shape(x)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )[0]
    if jitter:
        mask = tf.cast(tf.reduce_max(x, axis=-1, keepdims=True) > 0, x.dtype)
        y = x / 255.0
        y = tf.image.stateless_random_brightness(y, 0.08, seeds[4])
        y = tf.image.stateless_random_contrast(y, 0.85, 1.15, seeds[5])
        y = tf.image.stateless_random_saturation(y, 0.8, 1.2, seeds[6])
        y = tf.image.stateless_random_hue(y, 0.03, seeds[7])
        x = tf.clip_by_value(y, 0.0, 1.0) * 255.0 * mask
    return x


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    shuffle: bool,
    augment: bool,
    seed: int,
    jitter: bool = False,
):
    """tf.data pipeline: cast (cached), shuffle, per-image augmentation with its own stateless seed, batch, prefetch.

    The seeds come from `Dataset.random(seed)`, which draws a new but reproducible stream each epoch, so
    every epoch sees new augmentations and two runs with one seed see the same ones.
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.float32)[:, None]))
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE).cache()
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    if augment:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: (augment_one(xy[0], s, jitter), xy[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    ds = ds.batch(batch_size)
    return ds.prefetch(tf.data.AUTOTUNE)


def predict_logits(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The model's pre-activation logits, in inference mode."""
    return np.asarray(model.predict(images.astype(np.float32), batch_size=batch_size, verbose=0), dtype=np.float64)[
        :, 0
    ]


def predict_proba(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Sigmoid of the model's logit, in inference mode."""
    return 1.0 / (1.0 + np.exp(-predict_logits(model, images, batch_size)))


def get_strategy(name: str):
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}; choose default, mirrored or multiworker")


def class_weights(y: np.ndarray) -> dict[int, float]:
    counts = np.bincount(y, minlength=2)
    return {c: len(y) / (2 * max(1, counts[c])) for c in (0, 1)}


def balance_embeddings(emb: np.ndarray, y: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """SMOTE or random oversampling in embedding space; returns (X, y, class counts before and after)."""
    before = _class_counts(y)
    if method in ("smote", "oversample") and min(np.bincount(y, minlength=2)) > 0:
        from imblearn.over_sampling import SMOTE, RandomOverSampler

        minority = int(min(np.bincount(y, minlength=2)))
        if method == "smote" and minority > 1:
            sampler = SMOTE(k_neighbors=min(5, minority - 1), random_state=seed)
        else:
            sampler = RandomOverSampler(random_state=seed)
        emb, y = sampler.fit_resample(emb, y)
    after = _class_counts(y)
    return emb, np.asarray(y), {"method": method, "before": before, "after": after}


def _fit_head_on_embeddings(model, xtr, ytr, xva, yva, opts: TrainOptions, strategy, verbose: int) -> tuple[dict, dict]:
    """Stage 1: frozen backbone, embeddings computed once, the Dense head trained on them and copied into model."""
    import keras

    from training.model import LOGIT_LAYER, embedding_model

    emb = embedding_model(model)
    etr = np.asarray(emb.predict(xtr.astype(np.float32), batch_size=opts.batch_size, verbose=0))
    eva = np.asarray(emb.predict(xva.astype(np.float32), batch_size=opts.batch_size, verbose=0))
    etr_b, ytr_b, balance = balance_embeddings(etr, ytr, opts.balance, opts.seed)
    with strategy.scope():
        head = keras.Sequential(
            [
                keras.Input((etr.shape[1],)),
                keras.layers.Dropout(opts.dropout),
                keras.layers.Dense(1, name="head_logit", dtype="float32"),
            ]
        )
        head.compile(
            optimizer=keras.optimizers.Adam(opts.learning_rate),
            loss=keras.losses.BinaryCrossentropy(from_logits=True),
            metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")],
        )
    cw = class_weights(ytr_b) if opts.balance == "class-weight" else None
    hist = head.fit(
        etr_b,
        ytr_b.astype(np.float32)[:, None],
        validation_data=(eva, yva.astype(np.float32)[:, None]),
        epochs=opts.head_epochs,
        batch_size=max(opts.batch_size, 32),
        class_weight=cw,
        verbose=0,
        callbacks=[
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=max(opts.patience, 10), restore_best_weights=True
            )
        ],
    )
    model.get_layer(LOGIT_LAYER).set_weights(head.get_layer("head_logit").get_weights())
    if verbose:
        print(
            f"stage 1 (head on cached embeddings): {len(hist.history['loss'])} epochs, best val_loss "
            f"{min(hist.history['val_loss']):.4f}; balance {balance}",
            file=sys.stderr,
        )
    return hist.history, balance


# run_training, in steps: start the run, load and split, fit the stages, score, choose the operating point,
# calibrate, write the run. The values passed between steps are the frozen dataclasses below.


@dataclass(frozen=True)
class Part:
    """One loaded split: images (N, H, W, 3), labels (N,) and the samples they came from, in that order."""

    x: np.ndarray
    y: np.ndarray
    kept: list


@dataclass(frozen=True)
class Splits:
    """What `load_and_split` read: the preprocessing contract, the data summary, the unreadable files and
    each loaded split by name, in split order (at least "train", "val" and "test")."""

    contract: PreprocessContract
    summary: dict
    problems: list[str]
    parts: dict[str, Part]

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            if name not in self.parts:
                raise KeyError(name)

    @property
    def train(self) -> Part:
        return self.parts["train"]

    @property
    def val(self) -> Part:
        return self.parts["val"]

    @property
    def test(self) -> Part:
        return self.parts["test"]


@dataclass(frozen=True)
class FittedModel:
    """What `fit_stages` trained: the model (already saved as model.keras), every stage's per-epoch history
    (stage 1's keys prefixed "head_"), the balancing record, and the last fit's epochs run, the seconds all
    stages took and the images the last fit saw per epoch (after any oversampling)."""

    model: Any
    history: dict[str, list]
    balance: dict
    epochs_run: int
    train_seconds: float
    train_images: int


@dataclass(frozen=True)
class Scores:
    """The trained model's validation and test logits, and their sigmoid probabilities (uncalibrated)."""

    val_logits: np.ndarray
    test_logits: np.ndarray
    val_prob: np.ndarray
    test_prob: np.ndarray


@dataclass(frozen=True)
class OperatingPoint:
    """The decision threshold, the review band [low, high] around it, and the rule that chose them."""

    threshold: float
    review_band: list[float]
    rule: str


@dataclass(frozen=True)
class _LastStage:
    """What the last (or only) fit trains with: its images and labels, learning rate and class weights, the
    balancing record so far and the history of the stage before it (empty for a one-stage run)."""

    x: np.ndarray
    y: np.ndarray
    learning_rate: float
    class_weight: dict[int, float] | None
    balance: dict
    history: dict[str, list]


def run_training(
    data_dir: str | Path, out_dir: str | Path, opts: TrainOptions, progress: bool = True, parts: dict | None = None
) -> dict:
    """Train and evaluate; returns the metrics dict that is also written to metrics.json.

    Args:
        parts: optional {"train", "val", "test"} -> samples (cross-validation passes its folds);
            by default a subject-grouped split by the option fractions.

    The steps: start the run (folder, seeds), load and split, fit the stages, score validation and test,
    choose the operating point, calibrate, write the run.
    """
    out = start_run(out_dir, opts)
    splits = load_and_split(data_dir, out, opts, progress, parts)
    fitted = fit_stages(splits, out, opts, progress)
    scores = score_splits(fitted.model, splits)
    point = choose_operating_point(splits.val.y, scores.val_prob, opts)
    calibration = calibrate(splits, scores)
    return write_run(data_dir, out, opts, splits, fitted, scores, point, calibration)


def start_run(out_dir: str | Path, opts: TrainOptions) -> Path:
    """Make the run folder and seed Python, NumPy and TensorFlow from `opts.seed` (with TensorFlow's
    deterministic kernels when `opts.deterministic`); returns the folder."""
    import keras
    import tensorflow as tf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(opts.seed)
    if opts.deterministic:
        tf.config.experimental.enable_op_determinism()
    return out


def load_and_split(data_dir: str | Path, out: Path, opts: TrainOptions, progress: bool, parts: dict | None) -> Splits:
    """Read the dataset, split it by subject (unless `parts` gives the split) and load each split's images.

    Takes the dataset folder, the run folder, the options, whether to print progress and warnings, and the
    optional given split; writes out/folds.csv (which image went to which split) and returns the `Splits`.
    Raises DatasetError when a split is empty.
    """
    samples = read_dataset(data_dir)
    contract = _preprocess_contract(samples, opts, progress)
    summary = summarize(samples)
    warning = subject_warning(samples)
    if warning and progress:
        print(warning, file=sys.stderr)
    if parts is None:
        parts = split_by_subject(
            samples,
            {"train": 1 - opts.test_fraction - opts.val_fraction, "val": opts.val_fraction, "test": opts.test_fraction},
            seed=opts.seed,
        )
    loaded: dict[str, Part] = {}
    problems: list[str] = []
    for name, part in parts.items():
        if not part:
            raise DatasetError(
                f"the {name} split is empty: the dataset has too few subjects or images for these fractions"
            )
        x, y, kept, bad = load_images(part, contract, progress=progress, um_per_px=opts.um_per_px)
        loaded[name] = Part(x, y, kept)
        problems += bad
    write_folds_csv(
        out / "folds.csv",
        [s for p in loaded.values() for s in p.kept],
        [name for name, p in loaded.items() for _ in p.kept],
    )
    return Splits(contract, summary, problems, loaded)


def fit_stages(splits: Splits, out: Path, opts: TrainOptions, progress: bool) -> FittedModel:
    """Build the model and train it in `opts.stages` stages (see the module docstring) with early stopping.

    Takes the loaded splits, the run folder, the options and whether to print progress; saves the best
    weights as out/model.keras and returns the `FittedModel`. Raises ValueError unless stages is 1 or 2.
    """
    import keras
    import tensorflow as tf

    from training.model import build_model

    gpus = tf.config.list_physical_devices("GPU")
    if opts.mixed_precision and gpus:
        keras.mixed_precision.set_global_policy("mixed_float16")
    strategy = get_strategy(opts.strategy)
    verbose = 2 if progress else 0
    with strategy.scope():
        model = build_model(opts.input_size, opts.backbone, opts.weights, opts.dropout, opts.bn_momentum)
    t0 = time.time()
    stage = _prepare_last_stage(model, splits, opts, strategy, verbose)
    last = _fit_last_stage(model, stage, splits.val, out, opts, strategy, verbose)
    train_s = time.time() - t0
    keras.mixed_precision.set_global_policy("float32")
    model.save(out / "model.keras")
    (out / "best.weights.h5").unlink(missing_ok=True)
    return FittedModel(
        model=model,
        history={**stage.history, **last},
        balance=stage.balance,
        epochs_run=len(last["loss"]),
        train_seconds=train_s,
        train_images=len(stage.x),
    )


def score_splits(model, splits: Splits) -> Scores:
    """The model's logits and probabilities on the validation and test images."""
    val_logits, test_logits = predict_logits(model, splits.val.x), predict_logits(model, splits.test.x)
    return Scores(val_logits, test_logits, _sigmoid(val_logits), _sigmoid(test_logits))


def choose_operating_point(y_val: np.ndarray, val_prob: np.ndarray, opts: TrainOptions) -> OperatingPoint:
    """The threshold and review band: chosen on validation for `opts.target_sensitivity` and `opts.band_level`
    when that is set and validation holds both classes, else `opts.threshold` and `opts.review_band`."""
    if opts.target_sensitivity is not None and _has_both_classes(y_val):
        threshold, band = operating_point(y_val, val_prob, opts.target_sensitivity, opts.band_level)
        return OperatingPoint(
            threshold,
            band,
            (
                f"validation: largest threshold with sensitivity >= {opts.target_sensitivity}; review band = "
                f"[threshold at sensitivity {opts.band_level}, threshold at specificity {opts.band_level}]"
            ),
        )
    return OperatingPoint(opts.threshold, list(opts.review_band), "fixed by options")


def calibrate(splits: Splits, scores: Scores) -> dict:
    """Fit a temperature on the validation logits (1.0 when validation lacks a class); returns
    {"temperature", "val_nll", "val_ece", "test_ece"}, each score {"before", "after"} scaling."""
    yva, yte = splits.val.y, splits.test.y
    # With one class in validation the NLL keeps falling as T -> 0: no temperature can be fitted.
    temperature = fit_temperature(yva, scores.val_logits) if _has_both_classes(yva) else 1.0
    return {
        "temperature": temperature,
        "val_nll": {"before": nll(yva, scores.val_logits), "after": nll(yva, scores.val_logits, temperature)},
        "val_ece": {"before": ece(yva, scores.val_prob), "after": ece(yva, _sigmoid(scores.val_logits / temperature))},
        "test_ece": {
            "before": ece(yte, scores.test_prob),
            "after": ece(yte, _sigmoid(scores.test_logits / temperature)),
        },
    }


def write_run(
    data_dir: str | Path,
    out: Path,
    opts: TrainOptions,
    splits: Splits,
    fitted: FittedModel,
    scores: Scores,
    point: OperatingPoint,
    calibration: dict,
) -> dict:
    """Write out/training.json (what `convert` needs), out/metrics.json, the training-curve plot and, when
    `opts.report`, the report; returns the metrics dict."""
    synthetic = _is_synthetic(data_dir)
    metrics = _metrics(opts, splits, fitted, scores, point, calibration, synthetic)
    info = _training_info(data_dir, opts, splits, fitted, point, calibration, synthetic)
    (out / "training.json").write_text(json.dumps(info, indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _plot_history(info["history"], out / "training_curves.png")
    if opts.report:
        from training.report import write_report

        write_report(
            out,
            fitted.model,
            splits.test.x,
            splits.test.y,
            scores.test_prob,
            metrics,
            info,
            [str(s.path) for s in splits.test.kept],
        )
    return metrics


def _preprocess_contract(samples: list, opts: TrainOptions, progress: bool) -> PreprocessContract:
    """The input size and, when the pixel size is known, the physical crop; warns when it is not."""
    crop_um = None if opts.um_per_px is None else round(largest_side(samples) * opts.um_per_px, 3)
    if crop_um is None and progress:
        print(
            "warning: --um-per-px not given: the bundle cannot crop cells at the trained scale on the device, "
            "which then scales each cell to the input and loses its size (see docs/scale.md)",
            file=sys.stderr,
        )
    return PreprocessContract(input_size=opts.input_size, crop_um=crop_um)


def _prepare_last_stage(model, splits: Splits, opts: TrainOptions, strategy, verbose: int) -> _LastStage:
    """Run whatever comes before the last fit for `opts.stages` (1 or 2, else ValueError); returns what the
    last fit trains with."""
    if opts.stages == 2:
        return _fit_head_then_unfreeze(model, splits, opts, strategy, verbose)
    if opts.stages == 1:
        return _one_stage(splits.train, opts)
    raise ValueError(f"stages must be 1 or 2, got {opts.stages}")


def _fit_head_then_unfreeze(model, splits: Splits, opts: TrainOptions, strategy, verbose: int) -> _LastStage:
    """Stage 1 of two: train the head on the frozen backbone's embeddings (balanced there as `opts.balance`
    asks), then unfreeze the top backbone layers; stage 2 fine-tunes them with class weights (unless balance
    is "none") at `opts.fine_tune_lr`."""
    from training.model import freeze_backbone, unfreeze

    tr, va = splits.train, splits.val
    cw = class_weights(tr.y) if opts.balance != "none" else None
    freeze_backbone(model)
    head_hist, balance = _fit_head_on_embeddings(model, tr.x, tr.y, va.x, va.y, opts, strategy, verbose)
    balance["fine_tune"] = "class weights" if cw else "none"
    unfreeze(model, opts.fine_tune_layers)
    return _LastStage(tr.x, tr.y, opts.fine_tune_lr, cw, balance, {f"head_{k}": v for k, v in head_hist.items()})


def _one_stage(train: Part, opts: TrainOptions) -> _LastStage:
    """The only stage trains everything at `opts.learning_rate`: on oversampled images when balance is
    "oversample" or "smote", else on the images as they are with class weights (unless balance is "none")."""
    balance = {"method": opts.balance, "before": _class_counts(train.y)}
    if opts.balance not in ("oversample", "smote"):
        cw = class_weights(train.y) if opts.balance != "none" else None
        return _LastStage(train.x, train.y, opts.learning_rate, cw, balance, {})
    # SMOTE interpolates embeddings, not pixels; a one-stage run oversamples images instead.
    idx = _oversample_indices(train.y, opts.seed)
    x, y = train.x[idx], train.y[idx]
    balance["after"] = _class_counts(y)
    balance["note"] = "one-stage run: images oversampled (SMOTE needs --stages 2)" if opts.balance == "smote" else ""
    return _LastStage(x, y, opts.learning_rate, None, balance, {})


def _fit_last_stage(
    model, stage: _LastStage, val: Part, out: Path, opts: TrainOptions, strategy, verbose: int
) -> dict[str, list]:
    """Compile and fit the model on augmented batches, stopping early on validation loss with the best weights
    restored (checkpointed to out/best.weights.h5 meanwhile); returns the fit's per-epoch history."""
    import keras

    with strategy.scope():
        model.compile(
            optimizer=keras.optimizers.Adam(stage.learning_rate),
            loss=keras.losses.BinaryCrossentropy(from_logits=True),
            metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")],
        )
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=opts.patience, restore_best_weights=True),
        keras.callbacks.ModelCheckpoint(
            str(out / "best.weights.h5"), monitor="val_loss", save_best_only=True, save_weights_only=True
        ),
    ]
    fit = model.fit(
        make_dataset(stage.x, stage.y, opts.batch_size, True, opts.augment, opts.seed, opts.color_jitter),
        validation_data=make_dataset(val.x, val.y, opts.batch_size, False, False, opts.seed),
        epochs=opts.epochs,
        class_weight=stage.class_weight,
        callbacks=callbacks,
        verbose=verbose,
    )
    return fit.history


def _metrics(
    opts: TrainOptions,
    splits: Splits,
    fitted: FittedModel,
    scores: Scores,
    point: OperatingPoint,
    calibration: dict,
    synthetic: bool,
) -> dict:
    """The metrics.json dict: test and validation metrics at the threshold, the operating point, calibration,
    balancing and training time."""
    va, te = splits.val, splits.test
    return {
        "synthetic_data": synthetic,
        "test": binary_metrics(te.y, scores.test_prob, point.threshold, groups=subject_groups(te.kept), seed=opts.seed),
        "val": binary_metrics(va.y, scores.val_prob, point.threshold, groups=subject_groups(va.kept), seed=opts.seed),
        "operating_point": {"threshold": point.threshold, "review_band": point.review_band, "rule": point.rule},
        "calibration": calibration,
        "balance": fitted.balance,
        "epochs_run": fitted.epochs_run,
        "stages": opts.stages,
        "train_seconds": round(fitted.train_seconds, 1),
        "train_images_per_second": round(fitted.train_images * fitted.epochs_run / max(fitted.train_seconds, 1e-9), 2),
    }


def _training_info(
    data_dir: str | Path,
    opts: TrainOptions,
    splits: Splits,
    fitted: FittedModel,
    point: OperatingPoint,
    calibration: dict,
    synthetic: bool,
) -> dict:
    """The training.json dict: options, labels, preprocessing contract, operating point, temperature, feature
    layer, data summary, split by subject and by file, history and versions."""
    import keras
    import tensorflow as tf

    from training.model import feature_layer_name

    summary = splits.summary
    return {
        "options": {**asdict(opts), "review_band": list(opts.review_band)},
        "labels": list(LABELS),
        "preprocess": splits.contract.to_dict(),
        "data_um_per_px": opts.um_per_px,
        "threshold": point.threshold,
        "review_band": point.review_band,
        "temperature": calibration["temperature"],
        "feature_layer": feature_layer_name(fitted.model),
        "data": {
            **summary,
            "root": str(Path(data_dir).resolve()),
            "unreadable": splits.problems,
            "synthetic": synthetic,
            "split_by": "subject"
            if summary["subject_ids_known"]
            else "image (no subject IDs: scores may be optimistic)",
        },
        "splits": {name: sorted({s.subject or str(s.path) for s in p.kept}) for name, p in splits.parts.items()},
        "split_files": {name: [str(s.path) for s in p.kept] for name, p in splits.parts.items()},
        "history": {k: [float(v) for v in vals] for k, vals in fitted.history.items()},
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "numpy": np.__version__,
            "git_commit": _git_commit(),
        },
    }


def _class_counts(y: np.ndarray) -> dict[str, int]:
    return {LABELS[c]: int(n) for c, n in enumerate(np.bincount(y, minlength=2))}


def _has_both_classes(y: np.ndarray) -> bool:
    return bool(0 < y.sum() < len(y))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def _oversample_indices(y: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = np.bincount(y, minlength=2)
    idx = [np.arange(len(y))]
    for c in (0, 1):
        extra = counts.max() - counts[c]
        if extra and counts[c]:
            idx.append(rng.choice(np.flatnonzero(y == c), extra, replace=True))
    return np.concatenate(idx)


def _is_synthetic(data_dir: str | Path) -> bool:
    return any(Path(data_dir).rglob("SYNTHETIC_README.txt"))


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _plot_history(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("accuracy", "loss"), strict=True):
        for prefix, stage in (("head_", "stage 1 "), ("", "")):
            if history.get(prefix + key):
                ax.plot(history[prefix + key], label=f"{stage}train {key}")
                ax.plot(history.get(f"{prefix}val_{key}", []), label=f"{stage}validation {key}")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
