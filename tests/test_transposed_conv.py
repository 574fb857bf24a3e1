"""Transposed convolutions: TRANSPOSE_CONV int8 per channel, as the converter's PTQ.

Real converter and LiteRT, tiny models. What the converter does, measured
here (TF 2.21): Conv1DTranspose and Conv2DTranspose are fully int8 in PTQ
(TRANSPOSE_CONV, per-channel weight scales on its output-channel dimension
0; Conv1DTranspose through EXPAND_DIMS / RESHAPE); RELU/RELU6 fuses into
TRANSPOSE_CONV only through a bias add (a bias, or a folded BatchNorm);
Conv3DTranspose stays float (CONV_3D_TRANSPOSE has float kernels only); a
dilated transposed conv does not convert at all (Conv2DBackpropInput).
"""

import keras
import numpy as np
import pytest
from keras import ops

import qat_plugin
from qat_plugin.layers import QuantizedLinear
from qat_plugin.quantizers import integer_weight
from tests.conftest import assert_keras_round_trip, assert_parity, images, qat_fit
from tests.test_quantizers import numpy_fake_quant

L = keras.layers


def conv_autoencoder():
    inputs = keras.Input((12, 12, 1))
    x = L.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inputs)
    x = L.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = L.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu")(x)
    x = L.Conv2DTranspose(4, 3, strides=2, padding="same")(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(4)(x))


def unet_block():
    inputs = keras.Input((12, 12, 1))
    skip = L.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(skip)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.Conv2DTranspose(8, 3, strides=2, padding="same", use_bias=False,
                          name="up")(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.Concatenate()([skip, x])
    x = L.Conv2D(4, 1)(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(4)(x))


def upsampler(shape, *layers):
    inputs = keras.Input(shape)
    x = inputs
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, L.Dense(4)(L.Flatten()(x)))


def trained(model, shape=(12, 12, 1)):
    x, y = images(96, shape)
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    return model, x, y


def ptq_and_qat(model, x, y):
    """The converter's int8 PTQ of `model` and its QAT export, inspected."""
    ptq = qat_plugin.inspect_tflite(
        qat_plugin.export_tflite(model, mode="int8", representative_data=x)
    )
    qat = qat_fit(model, x, y)
    data = qat_plugin.export_tflite(qat)
    return ptq, qat, data, qat_plugin.inspect_tflite(data)


def op_names(report):
    return sorted(op.name for op in report.ops)


@pytest.mark.tf_only
@pytest.mark.parametrize("make", [conv_autoencoder, unet_block])
def test_model_exports_fully_int8_with_the_ptq_ops_and_parity(make):
    model, x, y = trained(make())
    ptq, qat, data, report = ptq_and_qat(model, x, y)
    assert ptq.is_fully_int8
    assert report.is_fully_int8, [op.name for op in report.float_ops]
    assert op_names(report) == op_names(ptq)
    assert "TRANSPOSE_CONV" in report.op_counts
    assert_parity(qat, data, x)


@pytest.mark.tf_only
def test_exported_int8_weights_are_the_trained_ones():
    model, x, y = trained(unet_block())
    qat = qat_fit(model, x, y)
    up = qat.get_layer("up")
    assert isinstance(up, QuantizedLinear) and up.batch_norm is not None
    folded = up._float_kernels()[0]  # [h, w, out, in], BatchNorm folded
    values, scales = integer_weight(folded, (0, 1, 3))
    data = qat_plugin.export_tflite(qat)
    transpose_conv = next(
        op for op in qat_plugin.inspect_tflite(data).ops if op.name == "TRANSPOSE_CONV"
    )
    weight = transpose_conv.inputs[1]
    assert weight.dtype == "int8" and weight.per_channel and weight.quantized_dimension == 0
    np.testing.assert_allclose(weight.scales, scales.reshape(-1), rtol=1e-5)
    runner = qat_plugin.TFLiteModel(data, use_xnnpack=False)
    exported = runner.interpreter.get_tensor(weight.index)  # [out, h, w, in]
    np.testing.assert_array_equal(exported, np.transpose(values, (2, 0, 1, 3)))


@pytest.mark.tf_only
@pytest.mark.parametrize(
    "padding, output_padding, use_bias, activation",
    [
        ("same", None, True, L.ReLU),
        ("same", 1, False, L.ReLU),  # no bias: RELU is an op of its own
        ("valid", None, False, lambda: L.ReLU(6.0)),
        ("valid", 1, True, lambda: L.ReLU(6.0)),
        ("same", None, False, L.BatchNormalization),
    ],
)
def test_strides_padding_output_padding_and_bias_match_ptq(
    padding, output_padding, use_bias, activation
):
    model = upsampler(
        (6, 6, 2),
        L.Conv2DTranspose(4, 3, strides=2, padding=padding,
                          output_padding=output_padding, use_bias=use_bias),
        activation(),
    )
    model, x, y = trained(model, (6, 6, 2))
    ptq, qat, data, report = ptq_and_qat(model, x, y)
    assert ptq.is_fully_int8 and report.is_fully_int8
    assert op_names(report) == op_names(ptq)
    assert_parity(qat, data, x)


@pytest.mark.tf_only
def test_conv1d_transpose_is_int8_as_in_ptq():
    model = upsampler(
        (8, 2),
        L.Conv1DTranspose(4, 3, strides=2, padding="same", use_bias=False),
        L.BatchNormalization(),
        L.ReLU(),
    )
    model, x, y = trained(model, (8, 2))
    ptq, qat, data, report = ptq_and_qat(model, x, y)
    assert ptq.is_fully_int8 and report.is_fully_int8
    assert op_names(report) == op_names(ptq)
    assert report.op_counts["TRANSPOSE_CONV"] == 1 and "EXPAND_DIMS" in report.op_counts
    assert_parity(qat, data, x)


@pytest.mark.tf_only
def test_conv3d_transpose_stays_float_as_in_ptq():
    model = upsampler((3, 3, 3, 2), L.Conv3DTranspose(3, 3, strides=2, padding="same"))
    model, x, y = trained(model, (3, 3, 3, 2))
    ptq, qat, data, report = ptq_and_qat(model, x, y)
    # TFLite's CONV_3D_TRANSPOSE has float kernels only: PTQ leaves it
    # float between DEQUANTIZE and QUANTIZE, and so does QAT (policy float).
    for exported in (ptq, report):
        assert "CONV_3D_TRANSPOSE" in {op.name for op in exported.float_ops}
        assert exported.op_counts["DEQUANTIZE"] == exported.op_counts["QUANTIZE"] == 1
    assert op_names(report) == op_names(ptq)
    assert {op.name for op in report.float_ops} <= {"CONV_3D_TRANSPOSE", "ADD", "SHAPE"}
    assert_parity(qat, data, x)


@pytest.mark.tf_only
@pytest.mark.parametrize(
    "shape, kwargs, tf_op, reason",
    [
        ((6, 6, 2), {"dilation_rate": 2}, "Conv2DBackpropInput", r"dilation_rate \(2, 2\)"),
        ((2, 6, 6), {"data_format": "channels_first"}, "DataFormatVecPermute",
         "data_format 'channels_first'"),
    ],
)
def test_transposed_conv_without_builtin_kernel_is_refused_naming_the_way_out(
    shape, kwargs, tf_op, reason
):
    model = upsampler(shape, L.Conv2DTranspose(4, 3, padding="same", name="up", **kwargs))
    x = images(8, shape)[0]
    # The converter's own PTQ fails on it too: no builtin kernel.
    with pytest.raises(qat_plugin.ExportError, match=tf_op):
        qat_plugin.export_tflite(model, mode="int8", representative_data=x)
    with pytest.raises(qat_plugin.UnsupportedLayerError,
                       match=rf"'up'.*{reason}.*skip=\['up'\]"):
        qat_plugin.quantize_model(model)


@pytest.mark.tf_only
def test_an_all_zero_bias_still_fuses_the_relu_in_int8():
    # A fresh layer's bias is all zeros: the converter would drop the bias
    # add and leave RELU unfused and float; the export keeps the add.
    model = upsampler((6, 6, 2), L.Conv2DTranspose(4, 3, strides=2, padding="same"), L.ReLU())
    x = images(32, (6, 6, 2))[0]
    qat = qat_plugin.quantize_model(model)
    qat_plugin.calibrate(qat, x)
    data = qat_plugin.export_tflite(qat)
    report = qat_plugin.inspect_tflite(data)
    assert report.is_fully_int8 and "RELU" not in report.op_counts
    transpose_conv = next(op for op in report.ops if op.name == "TRANSPOSE_CONV")
    bias = transpose_conv.inputs[3]
    runner = qat_plugin.TFLiteModel(data, use_xnnpack=False)
    assert bias.dtype == "int32" and not runner.interpreter.get_tensor(bias.index).any()
    assert_parity(qat, data, x)


def test_qat_model_round_trips_through_keras_file(tmp_path):
    model = upsampler(
        (6, 6, 2),
        L.Conv2DTranspose(4, 3, strides=2, padding="same", use_bias=False),
        L.ReLU(),  # split: an intermediate fake-quant before it
        L.Conv2DTranspose(4, 3, strides=2, padding="same", use_bias=False),
        L.BatchNormalization(),
        L.ReLU(6.0),
    )
    model, x, y = trained(model, (6, 6, 2))
    qat = qat_fit(model, x, y)
    restored = assert_keras_round_trip(qat, x, tmp_path / "qat.keras")
    assert [type(layer).__name__ for layer in restored.layers].count("QuantizedLinear") == 3


# -- the layer against NumPy (backend-generic: also runs on JAX) -------------


def numpy_conv_transpose(x, kernel, stride):
    """A 'valid' transposed conv: every input pixel adds its kernel copy."""
    kh, kw, out, _ = kernel.shape
    n, h, w, _ = x.shape
    y = np.zeros((n, (h - 1) * stride + kh, (w - 1) * stride + kw, out))
    for i in range(h):
        for j in range(w):
            y[:, i * stride:i * stride + kh, j * stride:j * stride + kw] += np.einsum(
                "nc,hwoc->nhwo", x[:, i, j], kernel
            )
    return y


def make_transposed_bn(use_bias=True):
    rng = np.random.default_rng(3)
    conv = L.Conv2DTranspose(3, 3, strides=2, padding="valid", use_bias=use_bias)
    bn = L.BatchNormalization(momentum=0.9)
    layer = QuantizedLinear(conv, bn, activation="relu")
    layer.build((None, 4, 4, 2))
    conv.kernel.assign(rng.normal(size=(3, 3, 3, 2)))
    if use_bias:
        conv.bias.assign(rng.normal(size=3))
    bn.gamma.assign(rng.uniform(0.5, 2.0, size=3))
    bn.beta.assign(rng.normal(size=3))
    bn.moving_mean.assign(rng.normal(size=3))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=3))
    return layer, conv, bn


def folded_reference(conv, bn):
    """Kernel folded on its output-channel axis (-2) and snapped per channel."""
    c = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    kernel = conv.kernel.numpy() * c[:, None]
    scale = np.abs(kernel).max(axis=(0, 1, 3), keepdims=True) / 127
    bias = conv.bias.numpy() if conv.use_bias else 0.0
    return np.round(kernel / scale) * scale, bn.beta.numpy() + (bias - bn.moving_mean.numpy()) * c, c


def test_inference_is_the_folded_per_channel_quantized_transposed_conv():
    layer, conv, bn = make_transposed_bn()
    x = np.random.default_rng(4).normal(size=(8, 4, 4, 2)).astype("float32")
    layer(x, training=True)  # observes the output range
    kernel, bias, _ = folded_reference(conv, bn)
    want = np.maximum(numpy_conv_transpose(x, kernel, 2) + bias, 0)
    lo, hi = [float(v) for v in layer.output_quantizer.current_range()]
    got = ops.convert_to_numpy(layer(x, training=False))
    assert got.shape == (8, 9, 9, 3)
    np.testing.assert_allclose(got, numpy_fake_quant(want, lo, hi), atol=1e-4)
    exported = layer.export_constants()["kernels"][0]
    np.testing.assert_allclose(exported, kernel, rtol=1e-5, atol=1e-6)
    levels = np.abs(exported / (np.abs(exported).max(axis=(0, 1, 3), keepdims=True) / 127))
    assert np.all(levels.max(axis=(0, 1, 3)).round() == 127)  # one scale per output channel


def test_training_corrects_the_transposed_conv_to_batch_statistics():
    layer, conv, bn = make_transposed_bn(use_bias=False)
    x = np.random.default_rng(5).normal(size=(16, 4, 4, 2)).astype("float32")
    kernel, _, c = folded_reference(conv, bn)
    old_mean = bn.moving_mean.numpy()
    unfolded = numpy_conv_transpose(x, kernel, 2) / c
    mean, var = unfolded.mean((0, 1, 2)), unfolded.var((0, 1, 2))
    normalized = (unfolded - mean) / np.sqrt(var + bn.epsilon) * bn.gamma.numpy() + bn.beta.numpy()
    want = np.maximum(normalized, 0)
    want = numpy_fake_quant(want, min(want.min(), 0), want.max())
    got = ops.convert_to_numpy(layer(x, training=True))
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.9 * old_mean + 0.1 * mean,
                               rtol=1e-4, atol=1e-5)


def test_a_bias_free_transposed_conv_quantizes_before_its_activation():
    conv = L.Conv2DTranspose(3, 3, strides=2, use_bias=False)
    layer = QuantizedLinear(conv, activation="relu")
    assert layer.splits_activation
    assert [q.name for q in layer.activation_quantizers()] == ["intermediate", "output"]
    fused = QuantizedLinear(L.Conv2DTranspose(3, 3, strides=2), activation="relu")
    assert not fused.splits_activation and fused.intermediate_quantizer is None
