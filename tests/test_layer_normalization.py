"""LayerNormalization: fully int8, where the converter's PTQ leaves a float NEG.

Real converter and LiteRT, tiny models. Measured here (TF 2.21): PTQ of a
LayerNormalization is MEAN, DEQUANTIZE, NEG, QUANTIZE, SQUARED_DIFFERENCE,
MEAN, ADD, RSQRT, MUL, MUL, MUL, ADD (12 ops, NEG float); `rms_scaling` is
int8 in PTQ. The QAT export computes `x - mean` with SUB: 9 int8 ops
(7 with `rms_scaling`), no float op, no QUANTIZE / DEQUANTIZE.
"""

import keras
import numpy as np
import pytest

import qat_plugin
from qat_plugin.config.constants import NEVER
from qat_plugin.layers import QuantizedLayerNormalization
from qat_plugin.layers.base import quantized_layers
from tests.conftest import assert_keras_round_trip, assert_parity, qat_fit

L = keras.layers
SHAPE = (5, 6)


def data(n=64, seed=0):
    x = np.random.default_rng(seed).normal(size=(n,) + SHAPE).astype("float32")
    return x, (x.sum(axis=(1, 2)) > 0).astype("int64") + 2 * (x[:, 0, 0] > 0)


def normalized_model(**kwargs):
    inputs = keras.Input(SHAPE)
    norm = L.LayerNormalization(name="norm", **kwargs)
    x = norm(L.Dense(6)(inputs))
    model = keras.Model(inputs, L.Dense(4)(L.Flatten()(x)))
    rng = np.random.default_rng(1)  # Trained-looking gamma and beta.
    for weight in norm.weights:
        offset = 1.0 if "gamma" in weight.path else 0.0
        weight.assign(offset + 0.5 * rng.normal(size=weight.shape))
    return model


LN_OPS = ["ADD", "ADD", "MEAN", "MEAN", "MUL", "MUL", "RSQRT", "SQUARED_DIFFERENCE", "SUB"]


@pytest.mark.tf_only
@pytest.mark.parametrize(
    "kwargs, ln_ops",
    [
        ({}, LN_OPS),
        ({"axis": (1, 2)}, LN_OPS),
        ({"center": False, "scale": False}, [op for op in LN_OPS if op not in ("MUL", "ADD")]
         + ["ADD", "MUL"]),
        ({"rms_scaling": True}, ["ADD", "MEAN", "MEAN", "MUL", "MUL", "RSQRT",
                                 "SQUARED_DIFFERENCE"]),
    ],
)
def test_layer_normalization_is_fully_int8_with_fewer_ops_than_ptq(kwargs, ln_ops):
    model = normalized_model(**kwargs)
    x, y = data()
    ptq = qat_plugin.inspect_tflite(
        qat_plugin.export_tflite(model, mode="int8", representative_data=x)
    )
    qat = qat_fit(model, x, y)
    assert isinstance(qat.get_layer("norm"), QuantizedLayerNormalization)
    tflite = qat_plugin.export_tflite(qat)
    report = qat_plugin.inspect_tflite(tflite)
    assert report.is_fully_int8, report.summary()
    assert {op.name for op in ptq.float_ops} <= {"NEG"}
    assert len(report.ops) < len(ptq.ops)
    assert set(report.op_counts) <= set(ptq.op_counts) | {"SUB"}
    norm_ops = [op.name for op in report.ops if op.name not in (
        "FULLY_CONNECTED", "RESHAPE", "SHAPE", "STRIDED_SLICE", "PACK")]
    assert sorted(norm_ops) == sorted(ln_ops)
    # Nine requantizing int8 ops in a chain: each may round one step apart;
    # measured at most 2 output steps on these models.
    assert_parity(qat, tflite, x, max_steps=3.0)


def test_training_output_is_the_float_layer_normalization_up_to_int8_steps():
    norm = L.LayerNormalization()
    layer = QuantizedLayerNormalization(norm)
    x = np.random.default_rng(2).normal(size=(16, 4, 8)).astype("float32")
    got = keras.ops.convert_to_numpy(layer(x, training=True))
    want = keras.ops.convert_to_numpy(norm(x))
    low, high = [float(v) for v in layer.output_quantizer.current_range()]
    assert [q.name for q in layer.activation_quantizers()] == [
        "mean", "squares", "variance", "shifted", "inverse", "centred",
        "normalized", "scaled", "output"]
    # Every chained fake-quant adds rounding; the result stays within a few steps.
    assert np.abs(got - want).max() < 4 * (high - low) / 255


def test_qat_model_round_trips_through_keras_file(tmp_path):
    model = normalized_model()
    x, y = data(32)
    qat = qat_fit(model, x, y)
    restored = assert_keras_round_trip(qat, x, tmp_path / "qat.keras")
    assert isinstance(restored.get_layer("norm"), QuantizedLayerNormalization)


@pytest.mark.tf_only
def test_a_feed_forward_block_on_embeddings_is_fully_int8_where_ptq_is_not():
    # Embedding -> Dense(gelu) -> Dense -> residual Add -> LayerNormalization:
    # the feed-forward half of a transformer encoder.
    inputs = keras.Input((5,), dtype="int32")
    x = L.Embedding(20, 8)(inputs)
    hidden = L.Dense(8)(L.Dense(16, activation="gelu")(x))
    x = L.LayerNormalization(name="norm")(L.Add()([x, hidden]))
    model = keras.Model(inputs, L.Dense(4)(L.Flatten()(x)))
    ids = np.random.default_rng(0).integers(0, 20, (64, 5)).astype("int32")
    y = ids.sum(axis=1) % 4
    ptq = qat_plugin.inspect_tflite(
        qat_plugin.export_tflite(model, mode="int8", representative_data=ids)
    )
    qat = qat_fit(model, ids, y)
    tflite = qat_plugin.export_tflite(qat)
    report = qat_plugin.inspect_tflite(tflite)
    assert [op.name for op in ptq.float_ops] == ["NEG"]
    assert not report.float_ops and not report.conversion_ops, report.summary()
    assert len(report.ops) < len(ptq.ops)
    assert_parity(qat, tflite, ids, max_steps=3.0)


def test_untrained_layer_norm_before_a_reshape_exports_without_its_folded_ops():
    """gamma 1 and beta 0: the converter folds MUL(gamma) and ADD(beta) away;
    exported without them, a Flatten after the norm converts (it failed on
    the same-scale constraint of RESHAPE)."""
    inputs = keras.Input(SHAPE)
    x = L.LayerNormalization(name="norm")(L.Dense(6)(inputs))
    model = keras.Model(inputs, L.Dense(4)(L.Flatten()(x)))
    x_data, _ = data()
    qat = qat_plugin.quantize_model(model)
    qat_plugin.calibrate(qat, x_data)
    exported = qat_plugin.export_tflite(qat)
    report = qat_plugin.inspect_tflite(exported)
    assert report.is_fully_int8, report.summary()
    assert report.op_counts["MUL"] == 1 and report.op_counts["ADD"] == 1
    ptq = qat_plugin.export_tflite(model, mode="int8", representative_data=x_data)
    assert len(report.ops) <= len(qat_plugin.inspect_tflite(ptq).ops)
    assert_parity(qat, exported, x_data)


@pytest.mark.parametrize("trained", [False, True], ids=["untrained", "trained"])
def test_group_normalization_is_fully_int8_where_ptq_keeps_neg_and_square_float(
        trained, tmp_path):
    inputs = keras.Input((6, 6, 8))
    x = L.Conv2D(8, 3, padding="same")(inputs)
    norm = L.GroupNormalization(groups=2, name="norm")
    x = L.ReLU()(norm(x))
    model = keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(L.Conv2D(8, 3)(x))))
    if trained:
        rng = np.random.default_rng(1)
        for weight in norm.weights:
            offset = 1.0 if "gamma" in weight.path else 0.0
            weight.assign(offset + 0.5 * rng.normal(size=weight.shape))
    x_data = np.random.default_rng(0).normal(size=(32, 6, 6, 8)).astype("float32")
    qat = qat_plugin.quantize_model(model)
    assert type(qat.get_layer("norm")) is QuantizedLayerNormalization
    # Before fake-quant starts it computes Keras' GroupNormalization.
    for layer in quantized_layers(qat):
        layer.set_qat_schedule([NEVER, NEVER, NEVER])
    np.testing.assert_allclose(qat.predict(x_data, verbose=0),
                               model.predict(x_data, verbose=0), atol=1e-4)
    for layer in quantized_layers(qat):
        layer.set_qat_schedule([0, NEVER, NEVER])
    qat_plugin.calibrate(qat, x_data)
    exported = qat_plugin.export_tflite(qat)
    report = qat_plugin.inspect_tflite(exported)
    assert report.is_fully_int8, report.summary()
    ptq = qat_plugin.inspect_tflite(
        qat_plugin.export_tflite(model, mode="int8", representative_data=x_data))
    assert {op.name for op in ptq.float_ops} >= {"SQUARE"}
    assert len(report.ops) <= len(ptq.ops)
    assert_parity(qat, exported, x_data)
    assert_keras_round_trip(qat, x_data, tmp_path / "group_norm.keras")
