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
        images=x[None], transforms=transform[None], output_shape=tf.shape(x)[:2], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")[0]
    if jitter:
        mask = tf.cast(tf.reduce_max(x, axis=-1, keepdims=True) > 0, x.dtype)
        y = x / 255.0
        y = tf.image.stateless_random_brightness(y, 0.08, seeds[4])
        y = tf.image.stateless_random_contrast(y, 0.85, 1.15, seeds[5])
        y = tf.image.stateless_random_saturation(y, 0.8, 1.2, seeds[6])
        y = tf.image.stateless_random_hue(y, 0.03, seeds[7])
        x = tf.clip_by_value(y, 0.0, 1.0) * 255.0 * mask
    return x


def make_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool, augment: bool, seed: int,
                 jitter: bool = False):
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
            lambda xy, s: (augment_one(xy[0], s, jitter), xy[1]), num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True)
    ds = ds.batch(batch_size)
    return ds.prefetch(tf.data.AUTOTUNE)


def predict_logits(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The model's pre-activation logits, in inference mode."""
    return np.asarray(model.predict(images.astype(np.float32), batch_size=batch_size, verbose=0), dtype=np.float64)[:, 0]


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
    before = {LABELS[c]: int(n) for c, n in enumerate(np.bincount(y, minlength=2))}
    if method in ("smote", "oversample") and min(np.bincount(y, minlength=2)) > 0:
        from imblearn.over_sampling import SMOTE, RandomOverSampler

        minority = int(min(np.bincount(y, minlength=2)))
        if method == "smote" and minority > 1:
            sampler = SMOTE(k_neighbors=min(5, minority - 1), random_state=seed)
        else:
            sampler = RandomOverSampler(random_state=seed)
        emb, y = sampler.fit_resample(emb, y)
    after = {LABELS[c]: int(n) for c, n in enumerate(np.bincount(y, minlength=2))}
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
        head = keras.Sequential([keras.Input((etr.shape[1],)), keras.layers.Dropout(opts.dropout),
                                 keras.layers.Dense(1, name="head_logit", dtype="float32")])
        head.compile(optimizer=keras.optimizers.Adam(opts.learning_rate),
                     loss=keras.losses.BinaryCrossentropy(from_logits=True),
                     metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")])
    cw = class_weights(ytr_b) if opts.balance == "class-weight" else None
    hist = head.fit(etr_b, ytr_b.astype(np.float32)[:, None], validation_data=(eva, yva.astype(np.float32)[:, None]),
                    epochs=opts.head_epochs, batch_size=max(opts.batch_size, 32), class_weight=cw, verbose=0,
                    callbacks=[keras.callbacks.EarlyStopping(monitor="val_loss", patience=max(opts.patience, 10),
                                                             restore_best_weights=True)])
    model.get_layer(LOGIT_LAYER).set_weights(head.get_layer("head_logit").get_weights())
    if verbose:
        print(f"stage 1 (head on cached embeddings): {len(hist.history['loss'])} epochs, best val_loss "
              f"{min(hist.history['val_loss']):.4f}; balance {balance}", file=sys.stderr)
    return hist.history, balance


def run_training(data_dir: str | Path, out_dir: str | Path, opts: TrainOptions, progress: bool = True,
                 parts: dict | None = None) -> dict:
    """Train and evaluate; returns the metrics dict that is also written to metrics.json.

    Args:
        parts: optional {"train", "val", "test"} -> samples (cross-validation passes its folds);
            by default a subject-grouped split by the option fractions.
    """
    import keras
    import tensorflow as tf

    from training.model import build_model, feature_layer_name, freeze_backbone, unfreeze

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(opts.seed)
    if opts.deterministic:
        tf.config.experimental.enable_op_determinism()
    samples = read_dataset(data_dir)
    crop_um = None if opts.um_per_px is None else round(largest_side(samples) * opts.um_per_px, 3)
    contract = PreprocessContract(input_size=opts.input_size, crop_um=crop_um)
    if crop_um is None and progress:
        print("warning: --um-per-px not given: the bundle cannot crop cells at the trained scale on the device, "
              "which then scales each cell to the input and loses its size (see docs/scale.md)", file=sys.stderr)
    summary = summarize(samples)
    warning = subject_warning(samples)
    if warning and progress:
        print(warning, file=sys.stderr)
    if parts is None:
        parts = split_by_subject(samples, {"train": 1 - opts.test_fraction - opts.val_fraction,
                                           "val": opts.val_fraction, "test": opts.test_fraction}, seed=opts.seed)
    loaded, problems = {}, []
    for name, part in parts.items():
        if not part:
            raise DatasetError(f"the {name} split is empty: the dataset has too few subjects or images for these fractions")
        x, y, kept, bad = load_images(part, contract, progress=progress, um_per_px=opts.um_per_px)
        loaded[name] = (x, y, kept)
        problems += bad
    write_folds_csv(out / "folds.csv", [s for _, _, kept in loaded.values() for s in kept],
                    [name for name, (_, _, kept) in loaded.items() for _ in kept])
    (xtr, ytr, _), (xva, yva, kept_va), (xte, yte, kept_te) = loaded["train"], loaded["val"], loaded["test"]

    gpus = tf.config.list_physical_devices("GPU")
    if opts.mixed_precision and gpus:
        keras.mixed_precision.set_global_policy("mixed_float16")
    strategy = get_strategy(opts.strategy)
    verbose = 2 if progress else 0
    with strategy.scope():
        model = build_model(opts.input_size, opts.backbone, opts.weights, opts.dropout, opts.bn_momentum)
    history: dict[str, list] = {}
    balance = {"method": opts.balance,
               "before": {LABELS[c]: int(n) for c, n in enumerate(np.bincount(ytr, minlength=2))}}
    cw = class_weights(ytr) if opts.balance != "none" else None
    t0 = time.time()
    if opts.stages == 2:
        freeze_backbone(model)
        head_hist, balance = _fit_head_on_embeddings(model, xtr, ytr, xva, yva, opts, strategy, verbose)
        history.update({f"head_{k}": v for k, v in head_hist.items()})
        balance["fine_tune"] = "class weights" if cw else "none"
        unfreeze(model, opts.fine_tune_layers)
        lr = opts.fine_tune_lr
    elif opts.stages == 1:
        lr = opts.learning_rate
        if opts.balance in ("oversample", "smote"):
            # SMOTE interpolates embeddings, not pixels; a one-stage run oversamples images instead.
            idx = _oversample_indices(ytr, opts.seed)
            xtr, ytr = xtr[idx], ytr[idx]
            balance["after"] = {LABELS[c]: int(n) for c, n in enumerate(np.bincount(ytr, minlength=2))}
            balance["note"] = "one-stage run: images oversampled (SMOTE needs --stages 2)" if opts.balance == "smote" else ""
            cw = None
    else:
        raise ValueError(f"stages must be 1 or 2, got {opts.stages}")
    with strategy.scope():
        model.compile(optimizer=keras.optimizers.Adam(lr), loss=keras.losses.BinaryCrossentropy(from_logits=True),
                      metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")])
    callbacks = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=opts.patience, restore_best_weights=True),
                 keras.callbacks.ModelCheckpoint(str(out / "best.weights.h5"), monitor="val_loss",
                                                 save_best_only=True, save_weights_only=True)]
    fit = model.fit(
        make_dataset(xtr, ytr, opts.batch_size, True, opts.augment, opts.seed, opts.color_jitter),
        validation_data=make_dataset(xva, yva, opts.batch_size, False, False, opts.seed),
        epochs=opts.epochs, class_weight=cw, callbacks=callbacks, verbose=verbose,
    )
    history.update(fit.history)
    train_s = time.time() - t0
    keras.mixed_precision.set_global_policy("float32")
    model.save(out / "model.keras")
    (out / "best.weights.h5").unlink(missing_ok=True)

    val_logits, test_logits = predict_logits(model, xva), predict_logits(model, xte)
    val_prob, test_prob = _sigmoid(val_logits), _sigmoid(test_logits)
    threshold, band = opts.threshold, list(opts.review_band)
    op_rule = "fixed by options"
    if opts.target_sensitivity is not None and 0 < yva.sum() < len(yva):
        threshold, band = operating_point(yva, val_prob, opts.target_sensitivity, opts.band_level)
        op_rule = (f"validation: largest threshold with sensitivity >= {opts.target_sensitivity}; review band = "
                   f"[threshold at sensitivity {opts.band_level}, threshold at specificity {opts.band_level}]")
    # With one class in validation the NLL keeps falling as T -> 0: no temperature can be fitted.
    temperature = fit_temperature(yva, val_logits) if 0 < yva.sum() < len(yva) else 1.0
    calibration = {
        "temperature": temperature,
        "val_nll": {"before": nll(yva, val_logits), "after": nll(yva, val_logits, temperature)},
        "val_ece": {"before": ece(yva, val_prob), "after": ece(yva, _sigmoid(val_logits / temperature))},
        "test_ece": {"before": ece(yte, test_prob), "after": ece(yte, _sigmoid(test_logits / temperature))},
    }
    synthetic = _is_synthetic(data_dir)
    metrics = {
        "synthetic_data": synthetic,
        "test": binary_metrics(yte, test_prob, threshold, groups=subject_groups(kept_te), seed=opts.seed),
        "val": binary_metrics(yva, val_prob, threshold, groups=subject_groups(kept_va), seed=opts.seed),
        "operating_point": {"threshold": threshold, "review_band": band, "rule": op_rule},
        "calibration": calibration,
        "balance": balance,
        "epochs_run": len(fit.history["loss"]),
        "stages": opts.stages,
        "train_seconds": round(train_s, 1),
        "train_images_per_second": round(len(xtr) * len(fit.history["loss"]) / max(train_s, 1e-9), 2),
    }
    info = {
        "options": {**asdict(opts), "review_band": list(opts.review_band)},
        "labels": list(LABELS),
        "preprocess": contract.to_dict(),
        "data_um_per_px": opts.um_per_px,
        "threshold": threshold,
        "review_band": band,
        "temperature": temperature,
        "feature_layer": feature_layer_name(model),
        "data": {**summary, "root": str(Path(data_dir).resolve()), "unreadable": problems, "synthetic": synthetic,
                 "split_by": "subject" if summary["subject_ids_known"] else "image (no subject IDs: scores may be optimistic)"},
        "splits": {name: sorted({s.subject or str(s.path) for s in kept}) for name, (_, _, kept) in loaded.items()},
        "split_files": {name: [str(s.path) for s in kept] for name, (_, _, kept) in loaded.items()},
        "history": {k: [float(v) for v in vals] for k, vals in history.items()},
        "versions": {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
                     "numpy": np.__version__, "git_commit": _git_commit()},
    }
    (out / "training.json").write_text(json.dumps(info, indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _plot_history(info["history"], out / "training_curves.png")
    if opts.report:
        from training.report import write_report

        write_report(out, model, xte, yte, test_prob, metrics, info, [str(s.path) for s in kept_te])
    return metrics


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
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
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
