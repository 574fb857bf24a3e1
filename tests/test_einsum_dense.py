"""EinsumDense: FULLY_CONNECTED int8 per channel, as the converter's PTQ.

Real converter and LiteRT, tiny models. Measured here (TF 2.21): the
converter lowers an EinsumDense whose input's last axes are contracted
with the kernel, the kernel's other axes last in the output, to
FULLY_CONNECTED (plus RESHAPEs) with one weight scale per kernel output
index; with several output axes and a bias, PTQ leaves the bias as an int8
ADD after the RESHAPE, where the QAT export folds it into the op.
"""

import keras
import numpy as np
import pytest

import qat_plugin
from qat_plugin.layers import QuantizedLinear
from qat_plugin.quantizers import integer_weight
from tests.conftest import assert_keras_round_trip, assert_parity, qat_fit

L = keras.layers
SHAPE = (5, 6)


def data(n=64, shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n,) + shape, dtype=np.float32)
    return x, (x.reshape(n, -1).mean(axis=1) * 40).astype("int64") % 4


def einsum_model(equation, output_shape, bias_axes, shape=SHAPE, after=()):
    inputs = keras.Input(shape)
    x = L.EinsumDense(equation, output_shape, bias_axes=bias_axes, name="einsum")(inputs)
    for layer in after:
        x = layer(x)
    model = keras.Model(inputs, L.Dense(4)(L.Flatten()(x)))
    einsum = model.get_layer("einsum")
    if einsum.bias is not None:  # A fresh bias is zeros, which the converter drops.
        einsum.bias.assign(np.random.default_rng(1).normal(size=einsum.bias.shape))
    return model


def ptq_and_qat(model, x, y):
    ptq = qat_plugin.inspect_tflite(
        qat_plugin.export_tflite(model, mode="int8", representative_data=x)
    )
    qat = qat_fit(model, x, y)
    tflite = qat_plugin.export_tflite(qat)
    return ptq, qat, tflite, qat_plugin.inspect_tflite(tflite)


@pytest.mark.tf_only
@pytest.mark.parametrize(
    "equation, output_shape, bias_axes, shape, after, fewer",
    [
        ("abc,cd->abd", (5, 4), "d", SHAPE, (L.ReLU,), 0),
        ("abc,dc->abd", (5, 4), None, SHAPE, (), 0),
        # PTQ: FULLY_CONNECTED, RESHAPE, ADD; QAT folds the bias: one op less.
        ("abc,cde->abde", (5, 2, 3), "de", SHAPE, (), 1),
        ("abc,cde->abde", (5, 2, 3), "e", SHAPE, (), 1),
        ("abcd,cde->abe", (5, 4), "e", (5, 2, 3), (), 0),
        ("...b,bc->...c", (4,), "c", SHAPE, (L.BatchNormalization, L.ReLU), 0),
    ],
)
def test_einsum_dense_is_int8_fully_connected_as_in_ptq(
    equation, output_shape, bias_axes, shape, after, fewer
):
    model = einsum_model(equation, output_shape, bias_axes, shape,
                         [make() for make in after])
    x, y = data(shape=shape)
    ptq, qat, tflite, report = ptq_and_qat(model, x, y)
    assert isinstance(qat.get_layer("einsum"), QuantizedLinear)
    assert ptq.is_fully_int8 and report.is_fully_int8, report.summary()
    assert len(report.ops) == len(ptq.ops) - fewer
    assert set(report.op_counts) <= set(ptq.op_counts)
    assert "ADD" not in report.op_counts and "RELU" not in report.op_counts
    assert_parity(qat, tflite, x)


@pytest.mark.tf_only
def test_exported_weights_are_the_trained_ones_one_scale_per_output_index():
    model = einsum_model("abc,cde->abde", (5, 2, 3), "de")
    x, y = data()
    qat = qat_fit(model, x, y)
    kernel = qat.get_layer("einsum")._float_kernels()[0]  # [c, d, e]
    values, scales = integer_weight(kernel, (0,))
    report = qat_plugin.inspect_tflite(qat_plugin.export_tflite(qat))
    weight = next(op for op in report.ops if op.name == "FULLY_CONNECTED").inputs[1]
    assert weight.dtype == "int8" and weight.shape == (6, 6) and len(weight.scales) == 6
    np.testing.assert_allclose(weight.scales, np.ravel(scales), rtol=1e-5)
    exported = qat_plugin.TFLiteModel(qat_plugin.export_tflite(qat), use_xnnpack=False)
    stored = exported.interpreter.get_tensor(weight.index)  # [d * e, c]
    np.testing.assert_array_equal(stored, np.reshape(values, (6, 6)).T)


@pytest.mark.parametrize(
    "equation, output_shape, bias_axes, reason",
    [
        ("abc,cd->adb", (4, 5), None, "not the input's kept axes"),
        ("abc,bd->acd", (6, 4), None, "not the input's last axes"),
        ("abc,cd->abd", (5, 4), "b", "bias_axes 'b'"),
    ],
)
def test_other_equations_are_refused_naming_the_way_out(
    equation, output_shape, bias_axes, reason
):
    model = einsum_model(equation, output_shape, bias_axes)
    with pytest.raises(qat_plugin.UnsupportedLayerError,
                       match=rf"'einsum'.*{reason}.*skip=\['einsum'\]"):
        qat_plugin.quantize_model(model)


def test_qat_model_round_trips_through_keras_file(tmp_path):
    model = einsum_model("abc,cde->abde", (5, 2, 3), "de")
    x, y = data(32)
    qat = qat_fit(model, x, y)
    restored = assert_keras_round_trip(qat, x, tmp_path / "qat.keras")
    assert isinstance(restored.get_layer("einsum"), QuantizedLinear)


@pytest.mark.tf_only
def test_dense_on_a_sequence_keeps_its_bias_in_the_int8_fully_connected():
    # Measured: through `matmul`'s tensordot the converter left the bias ADD
    # and FULLY_CONNECTED float in the QAT export; the einsum lowering folds it.
    inputs = keras.Input(SHAPE)
    dense = L.Dense(6, name="ffn")
    model = keras.Model(inputs, L.Dense(4)(L.Flatten()(dense(inputs))))
    dense.bias.assign(np.random.default_rng(2).normal(size=6))
    x, y = data()
    ptq, qat, tflite, report = ptq_and_qat(model, x, y)
    assert ptq.is_fully_int8 and report.is_fully_int8, report.summary()
    assert len(report.ops) <= len(ptq.ops) and set(report.op_counts) <= set(ptq.op_counts)
    assert report.op_counts["FULLY_CONNECTED"] == 2 and "ADD" not in report.op_counts
    assert_parity(qat, tflite, x)
