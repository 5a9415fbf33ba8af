"""Training: metrics, calibration, operating point, balancing, two-stage runs, CV, evaluate and the report.

Runs use the smallcnn backbone at 32 px on tiny synthetic data (seconds each).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.metrics import (
    auc_ci,
    binary_metrics,
    ece,
    fit_temperature,
    nll,
    operating_point,
    roc_auc,
    threshold_for_sensitivity,
    weighted_f1,
)

CONVERT_KEYS = ("preprocess", "threshold", "review_band", "labels", "data", "options", "split_files", "feature_layer")


def test_ece_on_a_hand_example():
    # bin [0.1, 0.2): probs 0.1, 0.1, labels 0, 1 -> |0.5 - 0.1| = 0.4, weight 2/4
    # bin [0.9, 1.0]: probs 0.9, 1.0, labels 1, 1 -> |1 - 0.95| = 0.05, weight 2/4
    assert ece([0, 1, 1, 1], [0.1, 0.1, 0.9, 1.0]) == pytest.approx(0.5 * 0.4 + 0.5 * 0.05)
    assert ece([1, 0], [1.0, 0.0]) == pytest.approx(0.0)


def test_temperature_scaling_never_increases_validation_nll():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    for scale in (0.2, 1.0, 8.0):  # under- and over-confident logits
        logits = scale * (2 * y - 1 + rng.normal(0, 1.2, 300))
        t = fit_temperature(y, logits)
        assert t > 0 and nll(y, logits, t) <= nll(y, logits, 1.0) + 1e-12
    overconfident = 8.0 * (2 * y - 1 + rng.normal(0, 1.2, 300))
    assert fit_temperature(y, overconfident) > 1.5


def test_threshold_meets_target_sensitivity_and_band_contains_it():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(97, int), np.zeros(150, int)]
    p = np.clip(np.r_[rng.beta(5, 2, 97), rng.beta(2, 5, 150)], 0, 1)
    t = threshold_for_sensitivity(y, p, 0.95)
    assert np.mean(p[y == 1] >= t) >= 0.95
    assert np.mean(p[y == 1] >= np.nextafter(t, 1)) < 0.95, "not the largest such threshold"
    thr, (lo, hi) = operating_point(y, p, 0.95, 0.99)
    assert thr == t and lo <= thr <= hi
    assert np.mean(p[y == 1] >= lo) >= 0.99 and np.mean(p[y == 0] < hi) >= 0.99


def test_confidence_intervals_come_from_subjects_when_known():
    rng = np.random.default_rng(0)
    # 10 subjects, 30 cells each; each subject's cells share its own accuracy (correlated within subject).
    y, prob, groups = [], [], []
    for s in range(10):
        acc = 0.6 + 0.04 * s
        for _ in range(30):
            label = int(rng.random() < 0.5)
            right = rng.random() < acc
            y.append(label)
            prob.append(0.9 if label == right else 0.1)
            groups.append(f"S{s}")
    by_cell = binary_metrics(np.array(y), np.array(prob), 0.5)
    by_subject = binary_metrics(np.array(y), np.array(prob), 0.5, groups=groups)
    assert "Wilson" in by_cell["ci_method"] and "10 subjects" in by_subject["ci_method"]
    assert by_subject["accuracy"]["value"] == by_cell["accuracy"]["value"]
    for m in (by_cell, by_subject):
        lo, hi = m["accuracy"]["ci95"]
        assert lo <= m["accuracy"]["value"] <= hi
        assert m["auc_ci95"][0] <= m["auc"] <= m["auc_ci95"][1]
    # With 300 correlated cells of 10 patients, the honest interval is no narrower than the cell one.
    width = lambda m: m["accuracy"]["ci95"][1] - m["accuracy"]["ci95"][0]  # noqa: E731
    assert width(by_subject) >= 0.9 * width(by_cell)
    # One subject only: nothing to resample, so the cell-level interval (and says so).
    assert "Wilson" in binary_metrics(np.array(y[:30]), np.array(prob[:30]), 0.5, groups=groups[:30])["ci_method"]


def test_weighted_f1_and_auc_ci():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 * y + rng.random(200) * 0.7, 0, 1)
    assert weighted_f1(y, p, 0.5) == pytest.approx(f1_score(y, p >= 0.5, average="weighted"))
    lo, hi = auc_ci(y, p, n_boot=200, seed=0)
    assert lo <= roc_auc(y, p) <= hi
    assert auc_ci(y, p, n_boot=200, seed=0) == [lo, hi], "bootstrap must be seeded"


def test_smote_balances_counts_in_embedding_space():
    from training.train import balance_embeddings

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(40, 8))
    y = np.r_[np.zeros(32, int), np.ones(8, int)]
    xb, yb, info = balance_embeddings(emb, y, "smote", seed=0)
    assert info["before"] == {"normal": 32, "blast": 8} and info["after"] == {"normal": 32, "blast": 32}
    assert xb.shape == (64, 8) and np.bincount(yb).tolist() == [32, 32]
    _, _, none = balance_embeddings(emb, y, "none", seed=0)
    assert none["after"] == none["before"]


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory):
    pytest.importorskip("tensorflow")
    from training.synth import write_cell_dataset
    from training.train import TrainOptions, run_training

    root = tmp_path_factory.mktemp("two_stage")
    data = root / "cells"
    write_cell_dataset(data, n_subjects=12, cells_per_subject=10, size=48, seed=4, blast_fraction=0.34)
    opts = TrainOptions(
        input_size=32,
        epochs=4,
        batch_size=16,
        backbone="smallcnn",
        weights="none",
        stages=2,
        balance="smote",
        head_epochs=40,
        fine_tune_layers=2,
        fine_tune_lr=1e-4,
        seed=4,
    )
    metrics = run_training(data, root / "run", opts, progress=False)
    return root, data, metrics


@pytest.mark.slow
@pytest.mark.tf
def test_two_stage_run_writes_what_convert_needs(two_stage_run):
    import csv

    root, _, metrics = two_stage_run
    run = root / "run"
    info = json.loads((run / "training.json").read_text())
    assert (run / "model.keras").is_file()
    for key in CONVERT_KEYS:
        assert key in info, key
    lo, hi = info["review_band"]
    assert lo <= info["threshold"] <= hi and info["temperature"] > 0
    assert metrics["synthetic_data"] is True and metrics["stages"] == 2
    bal = metrics["balance"]
    assert bal["method"] == "smote" and bal["after"]["blast"] == bal["after"]["normal"] > bal["before"]["blast"]
    assert any(k.startswith("head_") for k in info["history"])
    assert metrics["test"]["f1_weighted"] is not None and "auc_ci95" in metrics["test"]
    cal = metrics["calibration"]
    assert cal["val_nll"]["after"] <= cal["val_nll"]["before"] + 1e-9
    with (run / "folds.csv").open() as f:
        rows = list(csv.DictReader(f))
    where: dict[str, set] = {}
    for r in rows:
        where.setdefault(r["subject"], set()).add(r["split"])
    assert rows and all(len(s) == 1 for s in where.values()), "a subject leaked across splits"


@pytest.mark.slow
@pytest.mark.tf
def test_threshold_meets_target_sensitivity_on_validation(two_stage_run):
    import keras

    from device.preprocess import PreprocessContract
    from training.datasets import load_images, read_dataset
    from training.train import predict_proba

    root, data, metrics = two_stage_run
    info = json.loads((root / "run" / "training.json").read_text())
    by_path = {str(s.path): s for s in read_dataset(data)}
    val = [by_path[p] for p in info["split_files"]["val"]]
    x, y, _, _ = load_images(val, PreprocessContract.from_dict(info["preprocess"]), progress=False)
    prob = predict_proba(keras.models.load_model(root / "run" / "model.keras", compile=False), x)
    assert np.mean(prob[y == 1] >= info["threshold"]) >= 0.95
    assert metrics["val"]["sensitivity"]["value"] >= 0.95


@pytest.mark.slow
@pytest.mark.tf
def test_report_files_and_evaluate(two_stage_run):
    from click.testing import CliRunner

    from training.cli import evaluate

    root, data, _ = two_stage_run
    for name in (
        "report.md",
        "metrics.json",
        "roc.png",
        "confusion_matrix.png",
        "reliability.png",
        "gradcam_grid.png",
        "training_curves.png",
    ):
        assert (root / "run" / name).is_file(), name
    assert "SYNTHETIC" in (root / "run" / "report.md").read_text()
    result = CliRunner().invoke(evaluate, [str(root / "run" / "model.keras"), "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert "SYNTHETIC" in result.output
    assert (root / "run" / "evaluation" / "report.md").is_file() and (root / "run" / "evaluation" / "roc.png").is_file()
    result = CliRunner().invoke(evaluate, [str(root / "nope.keras"), "--data", str(data)])
    assert result.exit_code == 1 and "not found" in result.output and "Traceback" not in result.output


@pytest.mark.slow
@pytest.mark.tf
def test_cross_validation_is_grouped_and_summarised(two_stage_run, tmp_path):
    import csv

    from training.cv import run_cv
    from training.train import TrainOptions

    _, data, _ = two_stage_run
    opts = TrainOptions(
        input_size=32,
        epochs=2,
        batch_size=16,
        backbone="smallcnn",
        weights="none",
        stages=1,
        balance="oversample",
        seed=0,
    )
    summary = run_cv(data, tmp_path / "cv", opts, k=2, progress=False)
    with (tmp_path / "cv" / "folds.csv").open() as f:
        rows = list(csv.DictReader(f))
    where: dict[str, set] = {}
    for r in rows:
        where.setdefault(r["subject"], set()).add(r["split"])
    assert all(len(s) == 1 for s in where.values()), "a subject is in two folds"
    assert {r["split"] for r in rows} == {"test", "fold0", "fold1"}
    assert len(summary["per_fold"]) == 2 and summary["mean_sd"]["test accuracy"]["n"] == 2
    # Validation folds set the thresholds: they are reported apart, as tuning data, never in the evidence.
    assert not any(key.startswith("val") for key in summary["mean_sd"])
    assert summary["tuning_val_mean_sd"]["val sensitivity"]["n"] == 2 and "construction" in summary["note"]
    assert (tmp_path / "cv" / "cv.json").is_file() and (tmp_path / "cv" / "fold1" / "model.keras").is_file()


@pytest.mark.tf
def test_augmentation_is_stateless_and_keeps_black_background():
    tf = pytest.importorskip("tensorflow")
    from training.train import augment_one

    img = np.zeros((32, 32, 3), np.float32)
    img[12:20, 12:20] = [180.0, 90.0, 200.0]
    a = augment_one(tf.constant(img), tf.constant([1, 2], tf.int64), jitter=True).numpy()
    b = augment_one(tf.constant(img), tf.constant([1, 2], tf.int64), jitter=True).numpy()
    c = augment_one(tf.constant(img), tf.constant([3, 4], tf.int64), jitter=True).numpy()
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # the seed, and only the seed, decides
    for out in (a, c):
        assert np.all(out[:4] == 0) and np.all(out[:, :4] == 0)  # the black background stays black
        assert out[14:18, 14:18].min() > 0 and out.max() <= 255.0  # the cell stays, in range


@pytest.mark.tf
def test_same_seed_same_model(tmp_path):
    """Two runs with one seed give the same weights (augmentation, shuffle, init and dropout all seeded)."""
    pytest.importorskip("tensorflow")
    from training.synth import write_cell_dataset
    from training.train import TrainOptions, run_training

    data = tmp_path / "cells"
    write_cell_dataset(data, n_subjects=6, cells_per_subject=6, size=48, seed=5)
    opts = TrainOptions(
        input_size=32,
        epochs=2,
        batch_size=8,
        backbone="smallcnn",
        weights="none",
        seed=7,
        stages=1,
        target_sensitivity=None,
    )
    weights = []
    for run in ("a", "b"):
        run_training(data, tmp_path / run, opts, progress=False)
        import keras

        weights.append(keras.saving.load_model(tmp_path / run / "model.keras").get_weights())
    assert len(weights[0]) == len(weights[1])
    for w0, w1 in zip(*weights, strict=True):
        np.testing.assert_array_equal(w0, w1)


@pytest.mark.tf
def test_resnet_preprocessing_lives_in_the_graph():
    pytest.importorskip("tensorflow")
    from training.model import build_model, feature_layer_name

    model = build_model(32, "resnet50", None)
    pre = model.get_layer("preprocess")(np.array([[[[10.0, 20.0, 30.0]]]], np.float32)).numpy()[0, 0, 0]
    np.testing.assert_allclose(pre, [30 - 103.939, 20 - 116.779, 10 - 123.68], atol=1e-3)  # RGB -> BGR, minus mean
    assert model.get_layer("gap") and model.get_layer("logit").units == 1 and feature_layer_name(model)


@pytest.mark.tf
def test_local_weights_file_gets_the_imagenet_input_scaling(tmp_path, monkeypatch):
    """--weights PATH must build the same function as --weights imagenet with the same file.

    Keras adds its compensating Rescaling only for weights == "imagenet"; the imagenet graph is built
    here offline by pointing Keras' download at the local file.
    """
    pytest.importorskip("tensorflow")
    import keras
    from keras.src.applications import efficientnet as keras_efficientnet

    from training.model import build_model

    # A notop weights file with ImageNet's normalization statistics, as Keras' own file has.
    base = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3))
    norm = next(layer for layer in base.layers if isinstance(layer, keras.layers.Normalization))
    mean, var, *rest = norm.get_weights()
    norm.set_weights(
        [np.array([0.485, 0.456, 0.406], mean.dtype), np.square([0.229, 0.224, 0.225]).astype(var.dtype), *rest]
    )
    norm.finalize_state()
    path = tmp_path / "efficientnetb0_notop.weights.h5"
    base.save_weights(path)

    monkeypatch.setattr(keras_efficientnet.file_utils, "get_file", lambda *a, **k: str(path))
    keras.utils.set_random_seed(0)
    imagenet = build_model(32, "efficientnetb0", weights="imagenet")
    keras.utils.set_random_seed(0)
    local = build_model(32, "efficientnetb0", weights=str(path))
    # The imagenet graph has one Rescaling more; the local one folds it into the Normalization variance.
    rescales = [sum(isinstance(layer, keras.layers.Rescaling) for layer in m.layers) for m in (imagenet, local)]
    assert rescales[0] == rescales[1] + 1
    # Same backbone function on the same 0-255 input (the head is random in both, so compare the embedding).
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype("float32")
    emb = [keras.Model(m.input, m.get_layer("gap").output)(x, training=False).numpy() for m in (imagenet, local)]
    np.testing.assert_allclose(emb[0], emb[1], rtol=1e-3, atol=1e-3 * float(np.abs(emb[0]).max()))
    # And without the fix the local model would differ: the stems see different inputs.
    plain = keras.applications.EfficientNetB0(include_top=False, weights=str(path), input_shape=(32, 32, 3))
    gap = keras.layers.GlobalAveragePooling2D()(plain.output)
    assert not np.allclose(keras.Model(plain.input, gap)(x, training=False).numpy(), emb[0], rtol=1e-3)


@pytest.mark.tf
def test_unfreeze_counts_the_layers_that_train():
    pytest.importorskip("tensorflow")
    import keras

    from training.model import backbone_layers, build_model, freeze_backbone, unfreeze

    model = build_model(32, "efficientnetb0", None)
    freeze_backbone(model)
    assert unfreeze(model, 20) == 20
    trainable = [layer for layer in backbone_layers(model) if layer.trainable and layer.weights]
    assert len(trainable) == 20
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in trainable)
    assert unfreeze(model, 0) == 0
