"""Quantization-aware fine-tuning (convert.qat): the fake-quant rounding, the shared graph, the distillation."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_convert import slow_tf

tf = pytest.importorskip("tensorflow")


def test_fake_quant_rounds_like_int8_with_an_exact_zero_and_a_straight_through_gradient():
    from convert.qat import fake_quant_class

    layer = fake_quant_class()(name="fq")
    x = tf.constant(np.linspace(-1.0, 3.0, 1001, dtype=np.float32))
    layer.build(x.shape)
    layer.observing = True  # calibration: the range becomes the extremes seen, [-1, 3]
    first = np.asarray(layer(x))
    layer.observing = False
    assert float(layer.low.numpy()) == pytest.approx(-1.0) and float(layer.high.numpy()) == pytest.approx(3.0)
    scale = 4.0 / 255
    assert len(np.unique(first)) <= 256, "8 bits: at most 256 levels"
    assert np.abs(first - x.numpy()).max() <= scale / 2 + 1e-6
    zero = np.asarray(layer(tf.constant([0.0]), training=True))
    assert zero[0] == 0.0, "zero is exact (asymmetric int8 with an integer zero point)"
    # Inside the range the gradient passes as if there were no rounding; outside it is clipped and stops.
    probe = tf.Variable([0.5, 2.0, 9.0, -7.0])
    with tf.GradientTape() as tape:
        y = layer(probe, training=True)
        total = tf.reduce_sum(y)
    grad = tape.gradient(total, probe).numpy()
    assert grad.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert float(y[2]) == pytest.approx(3.0, abs=scale) and float(y[3]) == pytest.approx(-1.0, abs=scale)
    assert float(layer.high.numpy()) == pytest.approx(3.0), "training never moves the range"


@slow_tf
def test_fake_quant_graph_simulates_the_converters_int8(small_run):
    """The rounding the student trains with is the converter's: the fake-quant graph, with its ranges observed
    on the calibration crops, gives the int8 model's logits far more closely than the float model does."""
    import keras

    from convert.qat import observe_ranges, quantization_aware
    from convert.run_info import read_run_info
    from convert.tflite import convert
    from device.runtime import interpreter_class
    from training.datasets import load_images, read_dataset

    root, data, _ = small_run
    info = read_run_info(root / "run" / "model.keras")
    model = keras.models.load_model(info.model_path, compile=False)
    x, _, _, _ = load_images(read_dataset(data), info.contract, um_per_px=info.data_um_per_px, progress=False)
    cal, probe = x[:64], x[64:128]
    _, graph = quantization_aware(model)
    observe_ranges(graph, cal)
    interpreter = interpreter_class()[0](model_content=convert(model, cal, "int8"), num_threads=2)
    runner = interpreter.get_signature_runner("serving_default")
    int8 = np.array([float(np.asarray(runner(image=c[None])["logit"]).ravel()[0]) for c in probe])
    simulated = graph.predict(probe.astype(np.float32), verbose=0)[:, 0]
    plain = model.predict(probe.astype(np.float32), verbose=0)[:, 0]
    assert np.abs(simulated - int8).mean() < 0.5 * np.abs(plain - int8).mean()


@slow_tf
def test_quantization_aware_graph_shares_the_students_weights_and_leaves_the_model_alone():
    import keras

    from convert.qat import quantization_aware
    from training.model import build_model

    model = build_model(32, "efficientnetb0", weights=None)
    before = [w.copy() for w in model.get_weights()]
    student, graph = quantization_aware(model)
    fq = [layer for layer in graph.layers if layer.name.startswith("fake_quant_")]
    bn = [layer for layer in student.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(fq) > 100 and bn and not any(layer.trainable for layer in bn), "BN frozen in inference mode"
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in graph.layers)
    names = {layer.name for layer in fq}
    assert "fake_quant_logit" in names and "fake_quant_block1a_se_excite" in names  # the logit, an SE gate
    x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)).astype(np.float32)
    graph.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    graph.train_on_batch(x, np.ones((8, 1), np.float32))
    # Training the fake-quantized graph moved the student's weights (the same variables) but not the model's.
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(before, student.get_weights(), strict=True))
    logit = student.get_layer("logit").kernel
    assert any(v is logit for v in graph.trainable_variables)


@slow_tf
def test_fine_tuning_keeps_the_float_models_answers_and_says_how_it_ran(small_run):
    import keras

    from convert.qat import FineTuneOptions, dihedral, fine_tune_for_int8
    from convert.run_info import read_run_info
    from training.datasets import load_images, read_dataset

    root, data, _ = small_run
    info = read_run_info(root / "run" / "model.keras")
    model = keras.models.load_model(info.model_path, compile=False)
    x, _, _, _ = load_images(read_dataset(data), info.contract, um_per_px=info.data_um_per_px, progress=False)
    opts = FineTuneOptions(epochs=2, batch_size=16)
    student, record = fine_tune_for_int8(model, x[:64], info.threshold, x[:32], opts)
    assert record["crops"] == 64 and len(record["loss_per_epoch"]) == 2 and record["fake_quant_tensors"] == 6
    assert record["epochs"] == 2 and record["seconds"] > 0 and "distilled" in record["method"]
    assert np.isfinite(record["logit_bias_correction"]) and 20 <= record["bias_measured_on"] <= 64
    # The student is taught to give the float model's answers: on all crops, the same label almost everywhere.
    centre = np.log(info.threshold / (1 - info.threshold))
    teacher = model.predict(x.astype(np.float32), verbose=0)[:, 0]
    learnt = student.predict(x.astype(np.float32), verbose=0)[:, 0]
    assert np.mean((teacher > centre) == (learnt > centre)) >= 0.95
    # The eight symmetries of a square, the augmentation the teacher's logits were computed on.
    crop = x[:1]
    assert np.array_equal(dihedral(crop, np.array([1])), np.rot90(crop, 1, (1, 2)))
    assert np.array_equal(dihedral(crop, np.array([4])), crop[:, :, ::-1])
    with pytest.raises(ValueError, match="at least 1"):
        FineTuneOptions(epochs=0)
