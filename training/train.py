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

With `strategy` mirrored (several GPUs) or multiworker (several machines, TF_CONFIG)
the same steps run distributed (`run_distributed`): every worker trains on its
shard with the custom step of training/distributed.py, and only the chief writes
the run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from device.preprocess import PreprocessContract
from training.datasets import (
    LABELS,
    DatasetError,
    largest_side,
    load_images,
    mark_duplicates,
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
    """default (Keras fit on one device) | mirrored (several GPUs of one machine) | multiworker (several machines,
    TF_CONFIG): the last two run the custom training step of training/distributed.py under tf.distribute."""
    worker_timeout: float = 300.0
    """multiworker: the longest a worker waits for the others (to join, or in one step) before it stops."""
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
    weights: np.ndarray | None = None,
    repeat: bool = False,
):
    """tf.data pipeline: cast (cached), shuffle, per-image augmentation with its own stateless seed, batch, prefetch.

    The seeds come from `Dataset.random(seed)`, which draws a new but reproducible stream each epoch, so
    every epoch sees new augmentations and two runs with one seed see the same ones. With `weights` the
    elements are (image, label, weight); with `repeat` the data repeats forever (reshuffled each pass) in
    full batches only, as the distributed loop wants (a fixed number of steps per epoch on every worker).
    """
    import tensorflow as tf

    columns = (images, labels.astype(np.float32)[:, None])
    if weights is not None:
        columns += (np.asarray(weights, dtype=np.float32),)
    ds = tf.data.Dataset.from_tensor_slices(columns)
    ds = ds.map(lambda x, *rest: (tf.cast(x, tf.float32), *rest), num_parallel_calls=tf.data.AUTOTUNE).cache()
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if augment:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: (augment_one(xy[0], s, jitter), *xy[1:]),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    ds = ds.batch(batch_size, drop_remainder=repeat)
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
        _say_head_fitted(hist.history, balance)
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
    choose the operating point, calibrate, write the run. With `opts.strategy` mirrored or multiworker the
    same steps run distributed (see `run_distributed`).
    """
    if opts.strategy in ("mirrored", "multiworker"):
        return run_distributed(data_dir, out_dir, opts, progress, parts)
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


def _say_head_fitted(history: dict, balance) -> None:
    """The line that ends stage 1, on one machine and on a cluster alike."""
    print(
        f"stage 1 (head on cached embeddings): {len(history['loss'])} epochs, best val_loss "
        f"{min(history['val_loss']):.4f}; balance {balance}",
        file=sys.stderr,
    )


def _write_folds(out: Path, loaded: dict[str, Part]) -> None:
    """out/folds.csv: every loaded image with its split (and its duplicate group)."""
    write_folds_csv(
        out / "folds.csv",
        [s for p in loaded.values() for s in p.kept],
        [name for name, p in loaded.items() for _ in p.kept],
    )


def _read_and_split(data_dir, opts, progress: bool, parts):
    """Read the dataset, fix the preprocessing contract, warn when subjects are unknown, mark duplicate images and
    split it by subject and duplicate group (unless `parts` is given): what a single machine and every worker of
    a cluster do alike."""
    samples = read_dataset(data_dir)
    contract = _preprocess_contract(samples, opts, progress)
    warning = subject_warning(samples)
    if warning and progress:
        print(warning, file=sys.stderr)
    if parts is None:
        samples = mark_duplicates(samples, progress)
        parts = split_by_subject(
            samples,
            {"train": 1 - opts.test_fraction - opts.val_fraction, "val": opts.val_fraction, "test": opts.test_fraction},
            seed=opts.seed,
        )
    else:  # a given split (cross-validation) comes with its duplicate groups already marked
        marked = {s.path: s.dup_group for part in parts.values() for s in part}
        samples = [replace(s, dup_group=marked.get(s.path, "")) for s in samples]
    summary = summarize(samples)
    return samples, contract, summary, parts


def load_and_split(data_dir: str | Path, out: Path, opts: TrainOptions, progress: bool, parts: dict | None) -> Splits:
    """Read the dataset, split it by subject (unless `parts` gives the split) and load each split's images.

    Takes the dataset folder, the run folder, the options, whether to print progress and warnings, and the
    optional given split; writes out/folds.csv (which image went to which split) and returns the `Splits`.
    Raises DatasetError when a split is empty.
    """
    samples, contract, summary, parts = _read_and_split(data_dir, opts, progress, parts)
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
    _write_folds(out, loaded)
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


# Distributed runs (--strategy mirrored | multiworker): every worker runs the same steps on its own shard;
# only the chief (worker 0) writes the run. The engine and the training step live in training/distributed.py.


@dataclass(frozen=True)
class Shards:
    """What one worker of a distributed run loaded. Every worker made the same subject-grouped split (checked
    across workers) and decoded only its shard of the training and validation images: every count-th image
    of each split, starting at its index.

    `assignment` is every split's samples as split; `train_kept` every worker's readable training samples, in
    split order, and `train_rows` the index in it of each row of this worker's `train`; `problems` the
    unreadable training files (this worker's with the decoder's message); `key` identifies the split and the
    options (it names the checkpoint)."""

    contract: PreprocessContract
    summary: dict
    assignment: dict[str, list]
    train: Part
    val: Part
    train_kept: list
    train_rows: np.ndarray
    problems: list[str]
    key: str

    @property
    def train_labels(self) -> np.ndarray:
        """The labels of every worker's readable training images (`train_kept`)."""
        return np.array([s.label for s in self.train_kept], dtype=np.int32)


def run_distributed(
    data_dir: str | Path, out_dir: str | Path, opts: TrainOptions, progress: bool = True, parts: dict | None = None
) -> dict:
    """`run_training` on tf.distribute: several GPUs (mirrored) or several machines (multiworker, TF_CONFIG).

    Every worker joins the cluster, checks that all split the same data, loads its shard, and trains with
    the others (training/distributed.py); the chief then scores the saved model on the whole validation and
    test splits and writes the run as `run_training` does. The other workers write into temporary folders
    that are removed, and return {"chief": False, "worker": index, "workers": count, "epochs_run": n}.
    Raises ClusterError (TF_CONFIG, data that differs between workers, a lost worker) or DatasetError.
    """
    import keras

    from training import distributed as dist

    worker = dist.current_worker(opts.strategy)
    log = _stderr if progress else None
    hint = (
        f" To resume, start every worker again with the same command: the chief continues from "
        f"{Path(out_dir) / 'checkpoint'} after the last completed epoch."
    )
    with dist.worker_folder(out_dir, worker) as out:
        start_run(out, opts)
        cluster = dist.make_cluster(opts.strategy, worker, opts.worker_timeout, hint, log, folder=out)
        try:
            shards = load_shards(data_dir, opts, progress and worker.is_chief, parts, cluster)
            fitted = fit_distributed(shards, out, opts, progress, cluster)
            cluster.finish()
        finally:
            cluster.close()
        if not worker.is_chief:
            return {"chief": False, "worker": worker.index, "workers": worker.count, "epochs_run": fitted.epochs_run}
        if log and worker.count > 1:
            log(
                "training done on every worker; the chief now scores the model and writes the run while the others "
                "exit (TensorFlow may log here that they 'stopped sending heartbeats': that is expected)"
            )
        splits = load_scoring_splits(shards, out, opts, progress)
        # A plain copy of the trained model, outside the strategy, for scoring, the report and Grad-CAM.
        fitted = FittedModel(**{**fitted.__dict__, "model": keras.models.load_model(out / "model.keras")})
        scores = score_splits(fitted.model, splits)
        point = choose_operating_point(splits.val.y, scores.val_prob, opts)
        calibration = calibrate(splits, scores)
        metrics = write_run(data_dir, out, opts, splits, fitted, scores, point, calibration)
        dist.Checkpoint(out / "checkpoint", shards.key, cluster).clear()
        return metrics


def load_shards(data_dir: str | Path, opts: TrainOptions, progress: bool, parts: dict | None, cluster) -> Shards:
    """Read the dataset and split it by subject as `load_and_split` does, check with the other workers that
    they made the same split with the same options, and decode this worker's shard of the training and
    validation images. Raises DatasetError (an empty split) or ClusterError (workers that differ, or a
    worker left without training images)."""
    from training import distributed as dist

    samples, contract, summary, parts = _read_and_split(data_dir, opts, progress, parts)
    for name, part in parts.items():
        if not part:
            raise DatasetError(
                f"the {name} split is empty: the dataset has too few subjects or images for these fractions"
            )
    split = _split_identity(parts)
    cluster.check_same(
        dist.fingerprint(split),
        "dataset and subject split",
        "give every worker the same files (a copy of the dataset or a shared file system) and the same --seed",
    )
    options = {**asdict(opts), "review_band": list(opts.review_band)}
    cluster.check_same(dist.fingerprint(options), "training options", "start every worker with the same command")
    worker = cluster.worker
    train, val = parts["train"], parts["val"]
    mine = worker.positions(len(train))
    x, y, kept, problems = load_images([train[p] for p in mine], contract, progress=progress, um_per_px=opts.um_per_px)
    readable = np.zeros(len(train))
    j = 0
    for p in mine:
        if j < len(kept) and kept[j] is train[p]:
            readable[p], j = 1.0, j + 1
    readable = cluster.all_reduce_sum(readable, "every worker's list of readable training images") > 0.5
    index = np.cumsum(readable) - 1
    rows = np.array([index[p] for p in mine if readable[p]], dtype=np.int64)
    counts = np.zeros(worker.count)
    counts[worker.index] = len(rows)
    counts = cluster.all_reduce_sum(counts, "every worker's count of training images")
    if counts.min() < 1:
        raise dist.ClusterError(
            f"worker(s) {np.flatnonzero(counts < 1).tolist()} have no readable training image: use fewer workers"
        )
    problems += [
        f"{train[p].path}: unreadable (found by worker {p % worker.count}), skipped"
        for p in range(len(train))
        if not readable[p] and p % worker.count != worker.index
    ]
    vx, vy, vkept, _ = load_images(
        [val[p] for p in worker.positions(len(val))], contract, progress=progress, um_per_px=opts.um_per_px
    )
    # The checkpoint's key: the split and the options that shape the model and its training (not the epochs,
    # patience or timeout, which a resumed run may change, nor the number of workers).
    shaping = {k: v for k, v in options.items() if k not in ("epochs", "patience", "worker_timeout", "report")}
    return Shards(
        contract=contract,
        summary=summary,
        assignment=dict(parts),
        train=Part(x, y, kept),
        val=Part(vx, vy, vkept),
        train_kept=[train[p] for p in range(len(train)) if readable[p]],
        train_rows=rows,
        problems=problems,
        key=dist.fingerprint({"split": split, "options": shaping}),
    )


def fit_distributed(shards: Shards, out: Path, opts: TrainOptions, progress: bool, cluster) -> FittedModel:
    """`fit_stages` under the cluster's strategy: the model built under its scope, stage 1 (two stages) on
    every worker's embeddings gathered by an all-reduce, the image-level fit with the custom distributed
    step, checkpointed to out/checkpoint/ after every epoch and resumed from there. Saves out/model.keras
    (on every worker; the others' out is temporary) and returns the `FittedModel`, whose history, as for one
    device, prefixes stage 1's keys with "head_" and whose `train_images` counts every worker's images."""
    import keras
    import tensorflow as tf

    from training import distributed as dist
    from training.model import build_model, freeze_backbone, unfreeze

    if opts.stages not in (1, 2):
        raise ValueError(f"stages must be 1 or 2, got {opts.stages}")
    if opts.mixed_precision and tf.config.list_physical_devices("GPU"):
        keras.mixed_precision.set_global_policy("mixed_float16")
    with cluster.strategy.scope():
        model = build_model(opts.input_size, opts.backbone, opts.weights, opts.dropout, opts.bn_momentum)
    checkpoint = dist.Checkpoint(out / "checkpoint", shards.key, cluster, _stderr if progress else None)
    t0 = time.time()
    resumed_stage, _ = checkpoint.resume_point()
    ytr = shards.train_labels
    extra: dict = {"balance": {"method": opts.balance, "before": _class_counts(ytr)}, "head_history": {}}
    rows = np.arange(len(shards.train.y))
    if opts.stages == 2:
        freeze_backbone(model)
        if resumed_stage != 2:
            head_history, balance = _fit_head_distributed(model, shards, opts, cluster, progress)
            extra = {"balance": balance, "head_history": {f"head_{k}": v for k, v in head_history.items()}}
        unfreeze(model, opts.fine_tune_layers)
        learning_rate = opts.fine_tune_lr
        cw = class_weights(ytr) if opts.balance != "none" else None
        extra["balance"]["fine_tune"] = "class weights" if cw else "none"
    else:
        learning_rate = opts.learning_rate
        cw = class_weights(ytr) if opts.balance not in ("oversample", "smote", "none") else None
        if opts.balance in ("oversample", "smote"):
            # The same oversampling as on one device, drawn over every worker's images; each worker keeps
            # the draws of its own images.
            drawn = _oversample_indices(ytr, opts.seed)
            extra["balance"]["after"] = _class_counts(ytr[drawn])
            extra["balance"]["note"] = (
                "one-stage run: images oversampled (SMOTE needs --stages 2)" if opts.balance == "smote" else ""
            )
            local = {int(g): i for i, g in enumerate(shards.train_rows)}
            rows = np.array([local[int(g)] for g in drawn if int(g) in local], dtype=np.int64)
    x, y = shards.train.x[rows], shards.train.y[rows]
    weights = np.array([cw[int(c)] for c in y], dtype=np.float32) if cw else np.ones(len(y), np.float32)
    total = int(cluster.all_reduce_sum(len(y), "every worker's count of training images"))
    global_batch = opts.batch_size * cluster.replicas
    config = dist.FitConfig(
        learning_rate=learning_rate,
        epochs=opts.epochs,
        patience=opts.patience,
        steps_per_epoch=max(1, -(-total // global_batch)),
        global_batch=global_batch,
        label=f"stage {opts.stages}" if opts.stages == 2 else "training",
    )
    state = dist.fit(
        model,
        cluster,
        _shard_dataset(x, y, weights, opts.batch_size, opts, cluster, augment=opts.augment),
        shards.val.x,
        shards.val.y,
        config,
        checkpoint=checkpoint,
        stage=opts.stages,
        extra=extra,
        verbose=progress,
    )
    train_s = time.time() - t0
    keras.mixed_precision.set_global_policy("float32")
    model.save(out / "model.keras")
    return FittedModel(
        model=model,
        history={**state.extra.get("head_history", {}), **state.history},
        balance=state.extra.get("balance", extra["balance"]),
        epochs_run=len(state.history["loss"]),
        train_seconds=train_s,
        train_images=total,
    )


def load_scoring_splits(shards: Shards, out: Path, opts: TrainOptions, progress: bool) -> Splits:
    """The chief, after a distributed fit: the whole validation and test splits loaded for scoring, the
    training split by its samples only (no images), out/folds.csv written; returns the `Splits`."""
    size = shards.contract.input_size
    loaded = {"train": Part(np.zeros((0, size, size, 3), np.uint8), shards.train_labels, shards.train_kept)}
    problems = list(shards.problems)
    for name, part in shards.assignment.items():
        if name != "train":
            x, y, kept, bad = load_images(part, shards.contract, progress=progress, um_per_px=opts.um_per_px)
            loaded[name] = Part(x, y, kept)
            problems += bad
    _write_folds(out, loaded)
    return Splits(shards.contract, shards.summary, problems, loaded)


def _fit_head_distributed(model, shards: Shards, opts: TrainOptions, cluster, progress: bool) -> tuple[dict, dict]:
    """Stage 1 distributed: each worker embeds its shard, an all-reduce gives every worker all the training
    embeddings (so that SMOTE or oversampling sees every image, identically on every worker), and the head
    trains on a shard of the balanced embeddings with the distributed step; its weights go into model."""
    import keras

    from training import distributed as dist
    from training.model import LOGIT_LAYER, embedding_model

    emb = embedding_model(model)
    local = _embed(emb, shards.train.x, opts.batch_size)
    full = np.zeros((len(shards.train_kept), local.shape[1]))
    full[shards.train_rows] = local
    etr = cluster.all_reduce_sum(full, "every worker's training embeddings").astype(np.float32)
    eva = _embed(emb, shards.val.x, opts.batch_size)
    etr_b, ytr_b, balance = balance_embeddings(etr, shards.train_labels, opts.balance, opts.seed)
    rows = cluster.worker.positions(len(etr_b))
    cw = class_weights(ytr_b) if opts.balance == "class-weight" else None
    weights = np.array([cw[int(c)] for c in ytr_b[rows]], np.float32) if cw else np.ones(len(rows), np.float32)
    with cluster.strategy.scope():
        head = keras.Sequential(
            [
                keras.Input((etr.shape[1],)),
                keras.layers.Dropout(opts.dropout),
                keras.layers.Dense(1, name="head_logit", dtype="float32"),
            ]
        )
    batch = max(opts.batch_size, 32)
    global_batch = batch * cluster.replicas
    config = dist.FitConfig(
        learning_rate=opts.learning_rate,
        epochs=opts.head_epochs,
        patience=max(opts.patience, 10),
        steps_per_epoch=max(1, -(-len(etr_b) // global_batch)),
        global_batch=global_batch,
        label="stage 1 (head on embeddings)",
    )
    state = dist.fit(
        head,
        cluster,
        _shard_dataset(etr_b[rows], ytr_b[rows], weights, batch, opts, cluster, augment=False),
        eva,
        shards.val.y,
        config,
        verbose=False,
    )
    model.get_layer(LOGIT_LAYER).set_weights(head.get_layer("head_logit").get_weights())
    if progress:
        _say_head_fitted(state.history, balance)
    return state.history, balance


def _embed(emb, x: np.ndarray, batch_size: int) -> np.ndarray:
    if not len(x):
        return np.zeros((0, emb.output_shape[-1]), np.float32)
    return np.asarray(emb.predict(x.astype(np.float32), batch_size=batch_size, verbose=0))


def _shard_dataset(x, y, weights, batch_size: int, opts: TrainOptions, cluster, augment: bool):
    """make_train_dataset for distributed.fit: this worker's (x, y, weights), shuffled, augmented and repeated,
    batched per replica, with seeds that differ between workers and between resumptions."""

    def make(input_context, first_epoch: int):
        seed = int(np.random.SeedSequence([opts.seed, cluster.worker.index, first_epoch]).generate_state(1)[0] >> 1)
        return make_dataset(x, y, batch_size, True, augment, seed, opts.color_jitter, weights=weights, repeat=True)

    return make


def _split_identity(parts: dict) -> list:
    """What must be equal on every worker: each split's files (relative to their common folder), labels,
    subjects and sizes."""
    paths = [s.path for part in parts.values() for s in part]
    root = Path(os.path.commonpath([str(p) for p in paths])) if paths else Path()

    def size(path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError:
            return -1

    return [
        [
            name,
            [
                [
                    str(Path(s.path).relative_to(root)) if root.parts else str(s.path),
                    s.label,
                    s.subject,
                    size(Path(s.path)),
                ]
                for s in part
            ],
        ]
        for name, part in parts.items()
    ]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
