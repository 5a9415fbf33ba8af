"""Training on a folder dataset: subject-grouped split, augmentation, fit, held-out evaluation.

Writes a run folder: `model.keras`, `training.json` (everything `convert` needs:
the preprocessing contract, the threshold and review band, the split by
subject, the data summary, seed and versions) and `metrics.json`, plus a
training-curve plot.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from device.preprocess import PreprocessContract
from training.datasets import LABELS, load_images, read_dataset, split_by_subject, summarize
from training.metrics import binary_metrics


@dataclass(frozen=True)
class TrainOptions:
    input_size: int = 300
    """Model input side in pixels (the paper used 300)."""
    epochs: int = 20
    """Maximum epochs (the paper's default); early stopping on validation loss may end sooner."""
    batch_size: int = 16
    learning_rate: float = 1e-3
    backbone: str = "efficientnetb3"
    weights: str | None = "imagenet"
    """"imagenet", "none", or a local weights file."""
    dropout: float = 0.3
    bn_momentum: float | None = None
    """BatchNorm momentum override; 0.9 helps short from-scratch runs (see DESIGN.md, known traps)."""
    test_fraction: float = 0.3
    val_fraction: float = 0.15
    patience: int = 8
    """Early-stopping patience in epochs (validation loss)."""
    seed: int = 0
    threshold: float = 0.5
    review_band: tuple[float, float] = (0.3, 0.7)
    augment: bool = True


def augmenter():
    """Rotation, flips and zoom as in the paper; fill with black like the C-NMC background."""
    import keras

    return keras.Sequential([
        keras.layers.RandomFlip("horizontal_and_vertical"),
        keras.layers.RandomRotation(0.5, fill_mode="constant", fill_value=0.0),
        keras.layers.RandomZoom((-0.1, 0.1), fill_mode="constant", fill_value=0.0),
    ], name="augment")


def make_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool, augment: bool, seed: int):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.float32)[:, None]))
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    if augment:
        aug = augmenter()
        ds = ds.map(lambda x, y: (aug(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def predict_proba(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Sigmoid of the model's logit, in inference mode."""
    logits = model.predict(images.astype(np.float32), batch_size=batch_size, verbose=0)[:, 0]
    return 1.0 / (1.0 + np.exp(-logits))


def run_training(data_dir: str | Path, out_dir: str | Path, opts: TrainOptions, progress: bool = True) -> dict:
    """Train and evaluate; returns the metrics dict that is also written to metrics.json."""
    import keras
    import tensorflow as tf

    from training.model import build_model, feature_layer_name

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(opts.seed)
    contract = PreprocessContract(input_size=opts.input_size)
    samples = read_dataset(data_dir)
    summary = summarize(samples)
    parts = split_by_subject(samples, {"train": 1 - opts.test_fraction - opts.val_fraction,
                                       "val": opts.val_fraction, "test": opts.test_fraction}, seed=opts.seed)
    loaded, problems = {}, []
    for name, part in parts.items():
        if not part:
            raise ValueError(f"the {name} split is empty: the dataset has too few subjects or images for these fractions")
        x, y, kept, bad = load_images(part, contract, progress=progress)
        loaded[name] = (x, y, kept)
        problems += bad
    (xtr, ytr, _), (xva, yva, _), (xte, yte, _) = loaded["train"], loaded["val"], loaded["test"]

    model = build_model(opts.input_size, opts.backbone, opts.weights, opts.dropout, opts.bn_momentum)
    model.compile(optimizer=keras.optimizers.Adam(opts.learning_rate),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")])
    counts = np.bincount(ytr, minlength=2)
    class_weight = {c: len(ytr) / (2 * max(1, counts[c])) for c in (0, 1)}
    callbacks = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=opts.patience, restore_best_weights=True)]
    t0 = time.time()
    history = model.fit(
        make_dataset(xtr, ytr, opts.batch_size, True, opts.augment, opts.seed),
        validation_data=make_dataset(xva, yva, opts.batch_size, False, False, opts.seed),
        epochs=opts.epochs, class_weight=class_weight, callbacks=callbacks, verbose=2 if progress else 0,
    )
    train_s = time.time() - t0
    model.save(out / "model.keras")

    metrics = {
        "synthetic_data": _is_synthetic(data_dir),
        "test": binary_metrics(yte, predict_proba(model, xte), opts.threshold),
        "val": binary_metrics(yva, predict_proba(model, xva), opts.threshold),
        "epochs_run": len(history.history["loss"]),
        "train_seconds": round(train_s, 1),
        "train_images_per_second": round(len(xtr) * len(history.history["loss"]) / max(train_s, 1e-9), 2),
    }
    info = {
        "options": {**asdict(opts), "review_band": list(opts.review_band)},
        "labels": list(LABELS),
        "preprocess": contract.to_dict(),
        "threshold": opts.threshold,
        "review_band": list(opts.review_band),
        "feature_layer": feature_layer_name(model),
        "data": {**summary, "root": str(Path(data_dir).resolve()), "unreadable": problems,
                 "split_by": "subject" if summary["subject_ids_known"] else "image (no subject IDs: scores may be optimistic)"},
        "splits": {name: sorted({s.subject or str(s.path) for s in kept}) for name, (_, _, kept) in loaded.items()},
        "split_files": {name: [str(s.path) for s in kept] for name, (_, _, kept) in loaded.items()},
        "history": {k: [float(v) for v in vals] for k, vals in history.history.items()},
        "versions": {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
                     "numpy": np.__version__, "git_commit": _git_commit()},
    }
    (out / "training.json").write_text(json.dumps(info, indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _plot_history(info["history"], out / "training_curves.png")
    return metrics


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
        ax.plot(history.get(key, []), label=f"train {key}")
        ax.plot(history.get(f"val_{key}", []), label=f"validation {key}")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
