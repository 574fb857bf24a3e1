"""Quantized layers against NumPy references: BN folding, fusion, phases."""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

import qat_plugin
from qat_plugin.layers import (
    FakeQuant,
    QuantizedBatchNormalization,
    QuantizedLinear,
    QuantizeOutputWrapper,
)
from tests.test_quantizers import numpy_fake_quant


def snap(w, reduce_axes):
    scale = np.abs(w).max(axis=reduce_axes, keepdims=True) / 127
    return np.round(w / scale) * scale


def make_dense_bn(units=3, inputs=4):
    rng = np.random.default_rng(3)
    dense = keras.layers.Dense(units)
    bn = keras.layers.BatchNormalization(momentum=0.9)
    layer = QuantizedLinear(dense, bn, activation="relu")
    layer.build((None, inputs))
    dense.kernel.assign(rng.normal(size=(inputs, units)))
    dense.bias.assign(rng.normal(size=units))
    bn.gamma.assign(rng.uniform(0.5, 2.0, size=units))
    bn.beta.assign(rng.normal(size=units))
    bn.moving_mean.assign(rng.normal(size=units))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=units))
    return layer, dense, bn


def numpy_folded(dense, bn):
    c = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    kernel = snap(dense.kernel.numpy() * c, (0,))
    bias = bn.beta.numpy() + (dense.bias.numpy() - bn.moving_mean.numpy()) * c
    return kernel, bias, c


def test_inference_is_the_folded_quantized_op():
    layer, dense, bn = make_dense_bn()
    x = np.random.default_rng(4).normal(size=(16, 4)).astype("float32")
    layer(x, training=True)  # observes the output range
    kernel, bias, _ = numpy_folded(dense, bn)
    want = np.maximum(x @ kernel + bias, 0)
    lo, hi = [float(v) for v in layer.output_quantizer.current_range()]
    want = numpy_fake_quant(want, lo, hi)
    got = ops.convert_to_numpy(layer(x, training=False))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_training_corrects_to_batch_statistics_and_updates_moving_stats():
    layer, dense, bn = make_dense_bn()
    x = np.random.default_rng(5).normal(size=(32, 4)).astype("float32")
    kernel, _, c = numpy_folded(dense, bn)
    old_mean, old_var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    # The conv runs once, with the quantized folded kernel; dividing by c
    # recovers the unfolded output, normalized with batch statistics.
    unfolded = (x @ kernel) / c + dense.bias.numpy()
    mean, var = unfolded.mean(0), unfolded.var(0)
    normalized = (unfolded - mean) / np.sqrt(var + bn.epsilon) * bn.gamma.numpy() + bn.beta.numpy()
    want = np.maximum(normalized, 0)
    want = numpy_fake_quant(want, min(want.min(), 0), want.max())
    got = ops.convert_to_numpy(layer(x, training=True))
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.9 * old_mean + 0.1 * mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.9 * old_var + 0.1 * var, rtol=1e-4, atol=1e-5)


def test_bn_freeze_switches_to_moving_statistics_in_training():
    layer, dense, bn = make_dense_bn()
    layer.set_qat_schedule([0, 0, 2**31 - 1])  # BN frozen from step 0
    x = np.random.default_rng(6).normal(size=(32, 4)).astype("float32")
    mean_before = bn.moving_mean.numpy()
    got = ops.convert_to_numpy(layer(x, training=True))
    kernel, bias, _ = numpy_folded(dense, bn)
    want = np.maximum(x @ kernel + bias, 0)
    want = numpy_fake_quant(want, min(want.min(), 0), want.max())
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), mean_before)


def test_before_quantize_start_only_observers_run():
    layer, dense, bn = make_dense_bn()
    layer.set_qat_schedule([5, 2**31 - 1, 2**31 - 1])
    x = np.random.default_rng(7).normal(size=(8, 4)).astype("float32")
    layer(x, training=True)
    assert int(layer.qat_step.numpy()) == 1
    assert float(layer.output_quantizer.range_max.numpy()) > 0
    c = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    bias = bn.beta.numpy() + (dense.bias.numpy() - bn.moving_mean.numpy()) * c
    want = np.maximum(x @ (dense.kernel.numpy() * c) + bias, 0)  # no fake-quant at all
    np.testing.assert_allclose(ops.convert_to_numpy(layer(x, training=False)), want, atol=1e-5)


def test_a_bias_folded_with_batch_norm_trains_through_beta_only():
    # The batch statistics cancel the bias while BN trains; after the freeze
    # beta shifts the output as the bias would: the bias is not trainable,
    # so the optimizer gets no variable without a gradient.
    layer, dense, bn = make_dense_bn()
    assert not dense.bias.trainable
    assert {id(v) for v in layer.trainable_weights} == {
        id(dense.kernel), id(bn.gamma), id(bn.beta)}
    # Without beta, the bias is the only shift once BN is frozen: it trains.
    uncentered = QuantizedLinear(keras.layers.Dense(2), keras.layers.BatchNormalization(center=False))
    uncentered.build((None, 3))
    assert uncentered.layer.bias.trainable


def test_a_batch_norm_model_fits_with_a_gradient_for_every_trainable_variable():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, use_bias=True)(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(x))
    qat = qat_plugin.quantize_model(keras.Model(inputs, outputs))
    qat.compile("sgd", "mse")
    rng = np.random.default_rng(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qat.fit(rng.random((8, 6, 6, 2), "float32"), rng.random((8, 2), "float32"), verbose=0)
    assert not [w for w in caught if "Gradients do not exist" in str(w.message)]


def test_depthwise_kernel_gets_one_scale_per_output_channel():
    conv = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False)
    layer = QuantizedLinear(conv)
    layer.build((None, 6, 6, 3))
    kernel = np.random.default_rng(8).normal(size=(3, 3, 3, 2)).astype("float32")
    conv.kernel.assign(kernel)
    exported = layer.export_constants()["kernels"][0]
    np.testing.assert_allclose(exported, snap(kernel, (0, 1)), rtol=1e-6, atol=1e-7)
    assert np.all(np.abs(exported / (np.abs(kernel).max((0, 1)) / 127)).max((0, 1)).round() == 127)


def test_standalone_batch_norm_is_quantized_mul_then_add():
    bn = keras.layers.BatchNormalization()
    layer = QuantizedBatchNormalization(bn, activation="relu")
    layer.build((None, 3))
    rng = np.random.default_rng(9)
    bn.gamma.assign(rng.uniform(0.5, 2, 3))
    bn.beta.assign(rng.normal(size=3))
    bn.moving_mean.assign(rng.normal(size=3))
    bn.moving_variance.assign(rng.uniform(0.5, 2, 3))
    x = rng.normal(size=(64, 3)).astype("float32")
    layer.set_qat_schedule([0, 0, 2**31 - 1])  # moving statistics
    layer(x, training=True)
    scale = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    shift = bn.beta.numpy() - bn.moving_mean.numpy() * scale
    lo, hi = [float(v) for v in layer.scale_quantizer.current_range()]
    scaled = numpy_fake_quant(x * scale, lo, hi)
    lo, hi = [float(v) for v in layer.output_quantizer.current_range()]
    want = numpy_fake_quant(np.maximum(scaled + shift, 0), lo, hi)
    np.testing.assert_allclose(ops.convert_to_numpy(layer(x)), want, atol=1e-5)


def test_fixed_range_output_needs_no_observation():
    wrapper = QuantizeOutputWrapper(keras.layers.Activation("sigmoid"), fixed_range=(0.0, 255 / 256))
    x = np.linspace(-6, 6, 50, dtype="float32")[None]
    got = ops.convert_to_numpy(wrapper(x))
    want = numpy_fake_quant(1 / (1 + np.exp(-x.astype("float64"))), 0.0, 255 / 256)
    np.testing.assert_allclose(got, want, atol=1e-6)
    levels = got * 256
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)  # scale 1/256
    assert len(np.unique(got)) > 30


@pytest.mark.parametrize(
    "make",
    [
        lambda: QuantizedLinear(keras.layers.Dense(2), keras.layers.BatchNormalization(), activation="relu6"),
        lambda: QuantizeOutputWrapper(keras.layers.Add(), activation="relu"),
        lambda: QuantizedBatchNormalization(keras.layers.BatchNormalization()),
        lambda: FakeQuant(num_bits=16, ema_decay=0.9),
    ],
)
def test_layer_configs_round_trip(make):
    layer = make()
    config = keras.saving.serialize_keras_object(layer)
    clone = keras.saving.deserialize_keras_object(config)
    assert type(clone) is type(layer)
    assert clone.get_config() == layer.get_config()


def test_unfusable_activation_is_rejected_with_the_layer_name():
    with pytest.raises(ValueError, match="'dense_x'.*'sigmoid' cannot be fused"):
        QuantizedLinear(keras.layers.Dense(2, name="dense_x"), activation="sigmoid")


def test_unsupported_linear_class_is_rejected():
    # Conv3DTranspose has no int8 TFLite op (CONV_3D_TRANSPOSE is float only).
    with pytest.raises(ValueError, match="Conv3DTranspose"):
        QuantizedLinear(keras.layers.Conv3DTranspose(2, 3))
