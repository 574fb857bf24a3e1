"""Custom layers (`register_layer` + `LayerQuantization`), `skip=`, `calibrate`."""

import keras
import numpy as np
import pytest
from keras import layers as L
from keras import ops

import qat_plugin
from qat_plugin.layers import QuantizedCustomLayer
from tests.conftest import assert_keras_round_trip, assert_parity


@keras.saving.register_keras_serializable(package="qat_plugin_tests")
class MatMul(keras.layers.Layer):
    """A user's own fully-connected layer, in keras.ops."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(input_shape[-1], self.units), initializer="glorot_uniform"
        )
        self.bias = self.add_weight(shape=(self.units,), initializer="ones")

    def call(self, x):
        return ops.matmul(x, self.kernel) + self.bias

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="qat_plugin_tests")
class SwapSpatial(keras.layers.Layer):
    """Transposes height and width: TRANSPOSE keeps the input's scale."""

    def call(self, x):
        return ops.transpose(x, (0, 2, 1, 3))


@keras.saving.register_keras_serializable(package="qat_plugin_tests")
class NotRegistered(keras.layers.Layer):
    def call(self, x):
        return x * 2.0


@keras.saving.register_keras_serializable(package="qat_plugin_tests")
class KernelInADict(keras.layers.Layer):
    def build(self, input_shape):
        self.store = {"w": self.add_weight(shape=(input_shape[-1], 2))}

    def call(self, x):
        return ops.matmul(x, self.store["w"])


qat_plugin.register_layer(
    MatMul, qat_plugin.LayerQuantization(weights={"kernel": -1})
)
qat_plugin.register_layer(SwapSpatial, qat_plugin.LayerQuantization(passthrough=True))
qat_plugin.register_layer(
    KernelInADict, qat_plugin.LayerQuantization(weights={"store": -1})
)


def _data(n=64, shape=(8, 8, 3), seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n,) + shape).astype("float32")


def _custom_model():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, activation="relu")(inputs)
    x = SwapSpatial()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, MatMul(4)(x))


def test_custom_layer_quantizes_declared_weights_per_channel():
    layer = QuantizedCustomLayer(MatMul(3), weights={"kernel": -1})
    x = _data(4, (5,))
    layer(x)  # builds; nothing observed yet, so no output fake-quant
    kernel = layer.layer.kernel.numpy()
    scale = np.abs(kernel).max(axis=0, keepdims=True) / 127
    snapped = np.round(kernel / scale) * scale
    expected = x @ snapped + layer.layer.bias.numpy()
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(snapped, kernel)
    # The layer's own variables are untouched by the substitution.
    assert layer.layer.kernel is layer.layer.weights[0]
    np.testing.assert_array_equal(layer.layer.kernel.numpy(), kernel)


def test_custom_layer_trains_and_exports_fully_int8_with_parity():
    model = _custom_model()
    qat = qat_plugin.quantize_model(model)
    types = [type(layer).__name__ for layer in qat.layers]
    assert types.count("QuantizedCustomLayer") == 1
    assert "SwapSpatial" in types  # passthrough: no wrapper, no fake-quant
    x = _data()
    y = np.arange(len(x)) % 4
    qat.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    kernel_before = qat.get_layer(model.layers[-1].name).layer.kernel.numpy()
    qat.fit(x, y, epochs=1, batch_size=16, verbose=0)
    kernel_after = qat.get_layer(model.layers[-1].name).layer.kernel.numpy()
    assert not np.allclose(kernel_before, kernel_after)  # gradients reach it
    data = qat_plugin.export_tflite(qat)
    report = qat_plugin.inspect_tflite(data)
    assert report.is_fully_int8, report.float_ops
    assert report.op_counts["TRANSPOSE"] == 1
    assert report.op_counts["FULLY_CONNECTED"] == 1
    assert "QUANTIZE" not in report.op_counts
    ptq = qat_plugin.inspect_tflite(
        qat_plugin.export_tflite(model, representative_data=x)
    )
    assert len(report.ops) <= len(ptq.ops)
    assert_parity(qat, data, x)


def test_custom_layer_round_trips_through_keras_file(tmp_path):
    qat = qat_plugin.quantize_model(_custom_model())
    x = _data(16)
    qat_plugin.calibrate(qat, x)
    assert_keras_round_trip(qat, x, tmp_path / "custom.keras")


def test_unregistered_custom_layer_error_names_both_ways_out():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, NotRegistered(name="doubler")(inputs))
    with pytest.raises(qat_plugin.UnsupportedLayerError) as error:
        qat_plugin.quantize_model(model)
    message = str(error.value)
    assert "'doubler'" in message and "NotRegistered" in message
    assert "skip=['doubler']" in message and "LayerQuantization" in message
    assert "register_layer" in message


def test_registered_weight_that_is_not_a_variable_is_reported():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, KernelInADict(name="dict_kernel")(inputs))
    with pytest.raises(ValueError, match="'dict_kernel'.*'store'.*keras.Variable"):
        qat_plugin.quantize_model(model)


def test_bad_registrations_are_rejected():
    with pytest.raises(TypeError, match="Keras layer class"):
        qat_plugin.register_layer(object, "output")
    with pytest.raises(ValueError, match="policy must be one of"):
        qat_plugin.register_layer(NotRegistered, "linear")
    with pytest.raises(TypeError, match="weights must map"):
        qat_plugin.LayerQuantization(weights=["kernel"])
    with pytest.raises(ValueError, match="passthrough"):
        qat_plugin.LayerQuantization(weights={"kernel": -1}, passthrough=True)
    with pytest.raises(ValueError, match="contain 0"):
        qat_plugin.LayerQuantization(fixed_output_range=(0.5, 1.0))


def test_skip_keeps_a_float_island_with_quantize_dequantize():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, activation="relu")(inputs)
    # A single skipped op between two int8 tensors is one the converter
    # quantizes on its own; an island of two keeps its inner tensor float.
    x = L.Conv2D(6, 3, name="kept_float")(x)
    x = L.Activation("tanh", name="float_tanh")(x)
    outputs = L.Dense(4)(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    qat = qat_plugin.quantize_model(model, skip=["kept_float", "float_tanh"])
    assert type(qat.get_layer("kept_float")) is L.Conv2D
    x = _data(200)
    qat_plugin.calibrate(qat, x)
    data = qat_plugin.export_tflite(qat)
    report = qat_plugin.inspect_tflite(data)
    assert not report.is_fully_int8
    float_ops = [op.name for op in report.float_ops]
    assert "CONV_2D" in float_ops, float_ops
    assert report.op_counts["DEQUANTIZE"] >= 1 and report.op_counts["QUANTIZE"] >= 1
    assert_parity(qat, data, x)


def test_a_skipped_layer_normalization_stays_float_and_exports():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3)(inputs)
    x = L.LayerNormalization(name="norm")(x)
    outputs = L.Dense(4)(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    qat = qat_plugin.quantize_model(model, skip=["norm"])
    assert type(qat.get_layer("norm")) is L.LayerNormalization
    x = _data(200)
    qat_plugin.calibrate(qat, x)
    data = qat_plugin.export_tflite(qat)
    report = qat_plugin.inspect_tflite(data)
    assert report.float_ops and not report.is_fully_int8
    assert report.inputs[0].dtype == "int8" and report.outputs[0].dtype == "int8"
    assert_parity(qat, data, x)


def test_calibrate_updates_ranges_only():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3)(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    model = keras.Model(inputs, L.Dense(4)(L.GlobalAveragePooling2D()(x)))
    qat = qat_plugin.quantize_model(model)
    conv = qat.layers[2]
    mean_before = conv.batch_norm.moving_mean.numpy().copy()
    x = _data(40)
    assert qat_plugin.calibrate(qat, x, steps=2, batch_size=8) == 2
    np.testing.assert_array_equal(conv.batch_norm.moving_mean.numpy(), mean_before)
    assert int(conv.qat_step.numpy()) == 0
    quantizer = qat.layers[1].output_quantizer
    assert float(quantizer.range_min) == pytest.approx(float(x[:16].min()), abs=0.01)
    assert float(quantizer.range_max) == pytest.approx(float(x[:16].max()), abs=0.01)
    assert qat_plugin.inspect_tflite(qat_plugin.export_tflite(qat)).is_fully_int8


def test_a_long_calibration_runs_compiled_and_observes_as_eager_calls_do():
    from qat_plugin.layers.base import quantized_layers
    from qat_plugin.layers.modes import calibration_mode
    from qat_plugin.quantize.calibration import _EAGER_BATCHES

    inputs = keras.Input((8, 8, 3))
    left = L.Conv2D(4, 3, padding="same")(inputs)
    right = L.BatchNormalization()(L.Conv2D(4, 1)(inputs))
    x = L.Concatenate()([left, L.ReLU()(right)])
    model = keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(x)))
    compiled, eager = qat_plugin.quantize_model(model), qat_plugin.quantize_model(model)
    batches = [_data(4) * (1 + i) for i in range(_EAGER_BATCHES + 3)]
    assert qat_plugin.calibrate(compiled, np.concatenate(batches), batch_size=4) == len(batches)
    with calibration_mode():
        for batch in batches:
            eager(batch, training=False)
    assert len(compiled.non_trainable_weights) == len(eager.non_trainable_weights)
    for got, want in zip(compiled.non_trainable_weights, eager.non_trainable_weights):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=got.path)
    assert max(int(layer.qat_step.numpy()) for layer in quantized_layers(compiled)) == 0
    data = qat_plugin.export_tflite(compiled)
    assert qat_plugin.inspect_tflite(data).is_fully_int8
    assert_parity(compiled, data, batches[-1])


def test_calibrate_reads_datasets_and_rejects_bad_input():
    import tensorflow as tf

    inputs = keras.Input((4,))
    qat = qat_plugin.quantize_model(keras.Model(inputs, L.Dense(2)(inputs)))
    x = _data(12, (4,))
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(12))).batch(4)
    assert qat_plugin.calibrate(qat, dataset) == 3
    assert qat_plugin.calibrate(qat, dataset, steps=1) == 1
    with pytest.raises(ValueError, match="quantize_model"):
        qat_plugin.calibrate(keras.Model(inputs, L.Dense(2)(inputs)), x)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        qat_plugin.calibrate(qat, x, steps=0)
    with pytest.raises(ValueError, match="shape"):
        qat_plugin.calibrate(qat, _data(4, (5,)))
