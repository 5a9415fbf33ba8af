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
    assert record["clip_quantile"] == 0.9999 and record["clipped_tensors"] == 0, "this small CNN has no batch norm"
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


def _tiny_bn_model():
    """Conv, batch norm and swish twice, then the head convert expects (a "gap" layer and a "logit" Dense)."""
    import keras

    rng = np.random.default_rng(3)
    inp = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255)(inp)
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="conv1")(x)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Activation("swish", name="act1")(x)
    x = keras.layers.Conv2D(8, 1, use_bias=False, name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inp, keras.layers.Dense(1, name="logit")(x))
    for name in ("bn1", "bn2"):  # moving statistics of a trained model: not the identity
        bn = model.get_layer(name)
        bn.set_weights(
            [
                rng.uniform(0.5, 2.0, 8).astype(np.float32),
                rng.normal(0, 0.5, 8).astype(np.float32),
                rng.normal(0, 0.2, 8).astype(np.float32),
                rng.uniform(0.01, 0.1, 8).astype(np.float32),
            ]
        )
    return model


@slow_tf
def test_clipping_takes_each_batch_norm_to_its_quantile_and_the_converter_rounds_on_that_range():
    """The clip after a batch norm bounds its values at the quantile; in the int8 model the convolution's own
    output tensor (batch norm folded in) is quantized on the clip's range, not on the extremes."""
    import keras

    from convert.qat import CLIP_PREFIX, activation_bounds, clip_activations, quantization_aware
    from convert.tflite import convert
    from device.runtime import interpreter_class

    model = _tiny_bn_model()
    crops = np.random.default_rng(0).integers(0, 256, (48, 32, 32, 3)).astype(np.uint8)
    before = [w.copy() for w in model.get_weights()]
    assert clip_activations(model, crops, 1.0) == (model, 0), "quantile 1 clips nothing"
    bounds = activation_bounds(model, crops, 0.99)
    clipped, n = clip_activations(model, crops, 0.99)
    assert n == 2 and all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    for name in ("bn1", "bn2"):
        raw = np.asarray(keras.Model(model.input, model.get_layer(name).output)(crops.astype(np.float32)))
        low, high = bounds[name]
        assert np.quantile(raw, 0.01) == pytest.approx(low, abs=0.05 * (high - low))
        assert raw.min() < low - 0.1 * (high - low) or raw.max() > high + 0.1 * (high - low), "outliers beyond"
        out = np.asarray(keras.Model(clipped.input, clipped.get_layer(CLIP_PREFIX + name).output)(crops))
        step = (max(high, 0) - min(low, 0)) / 255  # the range moves by under a step to put zero on the grid
        assert out.min() >= min(low, 0) - step and out.max() <= max(high, 0) + step
        assert 0.005 < np.mean((out <= low + step) | (out >= high - step)) < 0.05, "about 1% + 1% clipped"
        assert len(np.unique(out)) <= 256
        if name == "bn1":  # (bn2's input already went through bn1's clip)
            assert np.abs(out - np.clip(raw, low, high)).max() <= step + 1e-5
    # The clip rounds on its own range, so the fake-quant graph adds no rounding of its own there.
    _, graph = quantization_aware(clipped)
    names = {layer.name for layer in graph.layers}
    assert CLIP_PREFIX + "bn1" in names and not {f"fake_quant_{CLIP_PREFIX}bn1", "fake_quant_bn1"} & names
    assert "fake_quant_act1" in names
    # The converter takes the clip's range and drops the op: the int8 tensor of bn1 (the folded convolution's
    # output) has 256 steps from low to high, and the model has no op the original's int8 model lacks.
    plain = interpreter_class()[0](model_content=convert(model, crops, "int8"))
    interpreter = interpreter_class()[0](model_content=convert(clipped, crops, "int8"))
    low, high = bounds["bn1"]
    scales = {
        t["quantization"][0]
        for t in interpreter.get_tensor_details()
        if "bn1" in t["name"] and t["dtype"] == np.int8 and t["quantization"][0] > 0
    }
    assert len(scales) == 1 and scales.pop() * 255 == pytest.approx(max(high, 0) - min(low, 0), rel=0.01)
    ops = sorted(o["op_name"] for o in interpreter._get_ops_details())
    assert ops == sorted(o["op_name"] for o in plain._get_ops_details())
    with pytest.raises(ValueError, match="quantile"):
        from convert.qat import FineTuneOptions

        FineTuneOptions(clip_quantile=0.5)


@slow_tf
def test_the_copies_keep_the_input_normalization_and_fine_tuning_trains_through_the_clips():
    """Cloning rebuilds Normalization from its config (mean 0, variance 1) and caches those as tensors: the
    student and the clipped copy must normalize the input as the trained model does (an ImageNet model's
    stem). And fine-tuning a model with batch norms clips them and records it."""
    import keras

    from convert.qat import FineTuneOptions, clip_activations, fine_tune_for_int8, quantization_aware
    from training.model import build_model

    model = build_model(32, "efficientnetb0", weights=None)
    norm = next(layer for layer in model.layers if isinstance(layer, keras.layers.Normalization))
    mean, variance, *rest = norm.get_weights()
    norm.set_weights([mean + 0.4, variance * 3.0, *rest])
    norm.finalize_state()
    crops = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
    want = np.asarray(keras.Model(model.input, norm.output)(crops.astype(np.float32)))
    student, _ = quantization_aware(model)
    clipped, n = clip_activations(model, crops, 0.999)
    assert n > 0
    for copy in (student, clipped):
        got = np.asarray(keras.Model(copy.input, copy.get_layer(norm.name).output)(crops.astype(np.float32)))
        assert np.allclose(got, want, atol=1e-5)
    assert np.allclose(student.predict(crops, verbose=0), model.predict(crops, verbose=0), atol=1e-4)

    tiny = _tiny_bn_model()
    x = np.random.default_rng(2).integers(0, 256, (32, 32, 32, 3)).astype(np.uint8)
    tuned, record = fine_tune_for_int8(tiny, x, 0.5, x[:16], FineTuneOptions(epochs=1, batch_size=16))
    assert record["clipped_tensors"] == 2 and "clipped" in record["method"]
    assert {layer.name for layer in tuned.layers} >= {"activation_clip_bn1", "activation_clip_bn2"}
