"""Float islands: an `Activation` holding a Python lambda, and layers kept
float by `skip=` right before a Flatten, Reshape or MaxPooling2D.

Real converter and LiteRT, tiny models.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers as L

import qat_plugin
from qat_plugin.layers import OperationLayer
from tests.conftest import assert_parity, images

SHAPE = (6, 6, 2)


def _gelu_tanh(t):
    return keras.activations.gelu(t, approximate=True)


def _model(middle, after=None):
    inputs = keras.Input(SHAPE)
    x = middle(L.Conv2D(4, 3, padding="same", name="conv")(inputs))
    if after is not None:
        x = after(x)
    return keras.Model(inputs, L.Dense(3, name="head")(L.Flatten()(x)))


def _exported(qat):
    x, _ = images(32, SHAPE)
    qat_plugin.calibrate(qat, x)
    data = qat_plugin.export_tflite(qat)
    assert_parity(qat, data, x)
    return x, data


def _ptq(model):
    x, _ = images(32, SHAPE)
    return qat_plugin.inspect_tflite(
        qat_plugin.export_tflite(model, representative_data=x))


def test_an_activation_holding_a_keras_ops_lambda_is_traced_into_its_ops():
    model = _model(L.Activation(lambda t: _gelu_tanh(t), name="act"))
    qat = qat_plugin.quantize_model(model)
    assert model.get_layer("act") not in qat.layers
    assert any(isinstance(getattr(layer, "layer", None), OperationLayer)
               for layer in qat.layers)
    _, data = _exported(qat)
    report = qat_plugin.inspect_tflite(data)
    assert report.is_fully_int8, report.op_counts
    assert report.op_counts["GELU"] == 1
    assert sum(report.op_counts.values()) <= sum(_ptq(model).op_counts.values())


def test_a_traced_lambda_activation_loads_from_keras_in_safe_mode(tmp_path):
    # The QAT model holds the traced ops, no Python code.
    qat = qat_plugin.quantize_model(_model(L.Activation(lambda t: _gelu_tanh(t))))
    x, _ = _exported(qat)
    path = tmp_path / "traced.keras"
    qat.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(restored.predict(x, verbose=0),
                               qat.predict(x, verbose=0), atol=1e-6)


def test_an_activation_holding_a_plain_function_is_traced_too():
    qat = qat_plugin.quantize_model(_model(L.Activation(_gelu_tanh, name="act")))
    _exported(qat)


def test_an_untraceable_lambda_activation_is_kept_float_as_in_ptq():
    # ELU stays float in the converter's own PTQ too.
    model = _model(L.Activation(lambda t: tf.nn.elu(t), name="act"))
    qat = qat_plugin.quantize_model(model)
    assert model.get_layer("act") in qat.layers  # Reused, not rebuilt.
    _, data = _exported(qat)
    report = qat_plugin.inspect_tflite(data)
    ptq = _ptq(model)
    assert [op.name for op in report.float_ops] == [op.name for op in ptq.float_ops]
    for op in ("QUANTIZE", "DEQUANTIZE"):
        assert report.op_counts[op] <= ptq.op_counts[op], (report.op_counts, ptq.op_counts)


def test_skip_of_a_lambda_activation_reuses_it():
    model = _model(L.Activation(lambda t: _gelu_tanh(t), name="act"))
    qat = qat_plugin.quantize_model(model, skip=["act"])
    assert model.get_layer("act") in qat.layers
    _exported(qat)


def test_a_kept_float_lambda_activation_does_not_load_as_in_keras(tmp_path):
    # Keras' Activation does not rebuild a lambda from a `.keras` file, in
    # safe mode or not (Keras 3.15): the float model's file fails the same
    # way.
    # (Keep the function in a Lambda layer, or name a registered function.)
    model = _model(L.Activation(lambda t: t * 2.0, name="act"))
    qat = qat_plugin.quantize_model(model, skip=["act"])
    _exported(qat)
    for name, kept in (("float", model), ("qat", qat)):
        path = tmp_path / f"{name}.keras"
        kept.save(path)
        for safe_mode in (True, False):
            with pytest.raises(TypeError, match="deserializing class 'Activation'"):
                keras.saving.load_model(path, safe_mode=safe_mode)


@pytest.mark.parametrize("after", [
    None, lambda: L.Reshape((-1,)), lambda: L.MaxPooling2D(),
], ids=["flatten", "reshape", "max_pool"])
def test_a_skipped_weighted_layer_before_a_same_scale_op_exports(after):
    # A weighted layer kept float with skip=, then a same-scale op.
    model = _model(L.GroupNormalization(2, name="norm"),
                   None if after is None else after())
    qat = qat_plugin.quantize_model(model, skip=["norm"])
    _, data = _exported(qat)
    report = qat_plugin.inspect_tflite(data)
    assert report.inputs[0].dtype == "int8" and report.outputs[0].dtype == "int8"
    ptq = _ptq(model)
    assert sum(report.op_counts.values()) <= sum(ptq.op_counts.values()), (
        report.op_counts, ptq.op_counts)


@pytest.mark.parametrize("after", [
    None, lambda: L.Reshape((-1,)), lambda: L.MaxPooling2D(),
], ids=["flatten", "reshape", "max_pool"])
def test_a_skipped_dense_before_a_same_scale_op_exports(after):
    model = _model(L.Dense(4, name="kept"), None if after is None else after())
    qat = qat_plugin.quantize_model(model, skip=["kept"])
    assert type(qat.get_layer("kept")) is L.Dense
    _exported(qat)
