"""measure_parity against a direct interpreter run."""

import keras
import numpy as np
import pytest

import qat_plugin


def _calibrated(seed=0, classes=4):
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
         keras.layers.Dense(classes)]
    )
    x = np.random.default_rng(seed).normal(size=(96, 6)).astype("float32")
    qat = qat_plugin.quantize_model(model)
    qat_plugin.calibrate(qat, x)
    return qat, x, qat_plugin.export_tflite(qat)


def test_parity_matches_a_direct_comparison():
    qat, x, data = _calibrated()
    parity = qat_plugin.measure_parity(qat, data, x)
    keras_out = qat.predict(x, verbose=0)
    runner = qat_plugin.TFLiteModel(data)
    tflite_out = runner.predict(x)
    step = runner.output_steps()[0]
    assert parity.samples == 96
    np.testing.assert_allclose(
        parity.max_error_steps[0], np.abs(keras_out - tflite_out).max() / step,
        rtol=1e-5,
    )
    same = keras_out.argmax(1) == tflite_out.argmax(1)
    assert parity.agreement[0] == pytest.approx(same.mean())
    top2 = np.sort(keras_out, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) / step > 1.001
    assert parity.ties[0] == int((~decided).sum())
    assert parity.decided_agreement[0] == pytest.approx(same[decided].mean())


def test_parity_of_two_engines_on_one_file():
    _, x, data = _calibrated()
    parity = qat_plugin.measure_parity(
        qat_plugin.TFLiteModel(data, use_xnnpack=False), data, x
    )
    # Engines differ by rounding, one step at most on a two-layer model.
    assert parity.max_error_steps[0] <= 1.0 + 1e-4
    assert parity.agreement[0] >= 0.95


def test_parity_refuses_another_models_export():
    qat, x, _ = _calibrated()
    _, _, other = _calibrated(classes=3)
    with pytest.raises(ValueError, match=r"shape \(96, 3\).*\(96, 4\)"):
        qat_plugin.measure_parity(qat, other, x)


def _small_cnn():
    L = keras.layers
    inputs = keras.Input((12, 12, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", name="conv")(inputs)))
    x = L.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    pooled = L.AveragePooling2D(2, name="pool")(x)
    x = L.Concatenate(name="cat")([pooled, L.Conv2D(4, 1, name="branch")(pooled)])
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(5, name="head")(x))


def test_local_parity_is_within_a_step_and_localizes_a_wrong_layer():
    x = np.random.default_rng(0).uniform(-1, 1, (32, 12, 12, 3)).astype("float32")
    qat = qat_plugin.quantize_model(_small_cnn())
    qat_plugin.calibrate(qat, x)
    data = qat_plugin.export_tflite(qat)
    local = qat_plugin.measure_local_parity(qat, data, x)
    assert {"conv", "depthwise", "pool", "branch", "cat", "gap", "head"} <= {
        r.layer for r in local.rows
    }
    assert local.max_error_steps <= 1.0 + 1e-3, str(local)
    # A Keras model that no longer matches its export: only that op shows.
    branch = qat.get_layer("branch")
    branch.layer.bias.assign(branch.layer.bias + 0.5)
    rows = {r.layer: r for r in qat_plugin.measure_local_parity(qat, data, x).rows}
    assert rows["branch"].max_error_steps > 3
    assert rows["head"].max_error_steps <= 1.0 + 1e-3
