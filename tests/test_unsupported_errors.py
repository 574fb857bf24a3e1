"""Unsupported layers: one error for all, `skip=` of layers that do not
rebuild from their config, and Select TF ops exports of skipped layers.

Real converter and LiteRT, tiny models.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers as L
from keras import ops
from keras.src.ops.numpy import Cumsum

import qat_plugin
from qat_plugin import registry
from qat_plugin.layers import OperationLayer
from qat_plugin.tflite.arena import arena_plan
from qat_plugin.tflite.flatbuffer import read_graph
from qat_plugin.tflite.targets import check_target
from tests.conftest import assert_parity, images


class Unknown(keras.layers.Layer):
    def call(self, x):
        return x * 2.0


class NoConfigRoundTrip(keras.layers.Layer):
    """A weighted layer whose `get_config` carries what `__init__` refuses
    (as keras-hub's ViTPatchingAndEmbedding does)."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.scale

    def get_config(self):
        return {**super().get_config(), "derived": 3}


def _head(x):
    return L.Dense(3)(L.Flatten()(x))


def _unsupported_model():
    inputs = keras.Input((6, 6, 2))
    x = L.Conv2D(4, 3, padding="same")(inputs)
    x = Unknown(name="unknown_a")(x)
    x = ops.cumsum(x, axis=-1)
    x = Unknown(name="unknown_b")(x)
    return keras.Model(inputs, _head(x))


def test_one_error_lists_every_unsupported_layer_and_one_skip_list():
    model = _unsupported_model()
    with pytest.raises(qat_plugin.UnsupportedLayerError) as error:
        qat_plugin.quantize_model(model)
    message = str(error.value)
    cumsum = next(op.name for op in model.operations if isinstance(op, Cumsum))
    assert "3 layers" in message
    for name in ("unknown_a", "unknown_b", cumsum):
        assert f"'{name}'" in message
    assert f"{Unknown.__module__}.Unknown" in message
    assert "keras.src.ops.numpy.Cumsum" in message
    assert "from keras.src.ops.numpy import Cumsum" in message
    skip = f"skip={['unknown_a', cumsum, 'unknown_b']!r}"
    assert skip in message
    # The skip= list the message gives gets past all of them.
    qat = qat_plugin.quantize_model(model, skip=["unknown_a", cumsum, "unknown_b"])
    x, _ = images(8, (6, 6, 2))
    qat_plugin.calibrate(qat, x)
    assert qat_plugin.inspect_tflite(qat_plugin.export_tflite(qat)).ops


def test_register_layer_takes_the_operation_class_the_error_names(monkeypatch):
    monkeypatch.setattr(registry, "_ROWS", dict(registry._ROWS))
    registry.register_layer(Cumsum, "output")
    inputs = keras.Input((6, 2))
    model = keras.Model(inputs, _head(ops.cumsum(L.Dense(4)(inputs), axis=-1)))
    qat = qat_plugin.quantize_model(model)
    assert any(isinstance(getattr(layer, "layer", None), OperationLayer)
               for layer in qat.layers)
    with pytest.raises(ValueError, match="no weights to declare"):
        registry.register_layer(Cumsum, qat_plugin.LayerQuantization(weights={"k": 0}))


def _lambda_model(function, name="lam"):
    inputs = keras.Input((6, 6, 2))
    x = L.Conv2D(4, 3, padding="same")(inputs)
    return keras.Model(inputs, _head(L.Lambda(function, name=name)(x)))


@pytest.mark.parametrize("function", [
    lambda t: tf.nn.relu(t) * 2.0,  # TensorFlow ops: float anyway
    lambda t: ops.relu(t) * 2.0,    # keras.ops: would be traced, skipped here
], ids=["tf_ops", "keras_ops"])
def test_skip_of_a_lambda_reuses_it_and_exports(function):
    model = _lambda_model(function)
    qat = qat_plugin.quantize_model(model, skip=["lam"])
    lam = next(layer for layer in qat.layers if isinstance(layer, L.Lambda))
    assert lam is model.get_layer("lam")  # Reused, not rebuilt.
    x, _ = images(16, (6, 6, 2))
    qat_plugin.calibrate(qat, x)
    data = qat_plugin.export_tflite(qat)
    assert_parity(qat, data, x)


def test_a_skipped_lambda_loads_from_keras_with_safe_mode_off(tmp_path):
    # A .keras file holds the Lambda's Python code: Keras loads it with
    # safe_mode=False only (and its function sees no module globals then).
    model = _lambda_model(lambda t: t * 2.0)
    qat = qat_plugin.quantize_model(model, skip=["lam"])
    x, _ = images(8, (6, 6, 2))
    qat_plugin.calibrate(qat, x)
    path = tmp_path / "lambda.keras"
    qat.save(path)
    with pytest.raises(ValueError, match="safe_mode"):
        keras.saving.load_model(path)
    restored = keras.saving.load_model(path, safe_mode=False)
    np.testing.assert_allclose(restored.predict(x, verbose=0),
                               qat.predict(x, verbose=0), atol=1e-6)


def test_an_untraceable_lambda_stays_float_without_skip():
    model = _lambda_model(lambda t: tf.nn.relu(t) * 2.0)
    qat = qat_plugin.quantize_model(model)
    assert model.get_layer("lam") in qat.layers
    x, _ = images(16, (6, 6, 2))
    qat_plugin.calibrate(qat, x)
    assert_parity(qat, qat_plugin.export_tflite(qat), x)


def test_skip_of_a_layer_whose_config_does_not_rebuild_it():
    inputs = keras.Input((6, 6, 2))
    x = NoConfigRoundTrip(name="odd")(L.Conv2D(4, 3, padding="same")(inputs))
    model = keras.Model(inputs, _head(L.Conv2D(4, 3)(x)))
    with pytest.raises(TypeError):  # The layer's own bug, as in keras-hub.
        NoConfigRoundTrip.from_config(model.get_layer("odd").get_config())
    with pytest.warns(UserWarning, match="'odd'.*share its weights"):
        qat = qat_plugin.quantize_model(model, skip=["odd"])
    odd = model.get_layer("odd")
    assert odd in qat.layers
    x, _ = images(16, (6, 6, 2))
    qat_plugin.calibrate(qat, x)
    assert_parity(qat, qat_plugin.export_tflite(qat), x)


def test_skip_of_a_weighted_layer_copies_it():
    # A layer that rebuilds from its config is a copy: training the QAT
    # model leaves the float model's weights alone.
    inputs = keras.Input((6, 6, 2))
    x = L.Conv2D(4, 3, padding="same", name="conv")(inputs)
    model = keras.Model(inputs, _head(L.LayerNormalization(name="norm")(x)))
    # LayerNormalization is int8 now: skip= keeps it float.
    qat = qat_plugin.quantize_model(model, skip=["norm"])
    copy = next(layer for layer in qat.layers if isinstance(layer, L.LayerNormalization))
    assert copy is not model.get_layer("norm")
    np.testing.assert_array_equal(copy.get_weights()[0],
                                  model.get_layer("norm").get_weights()[0])


def test_keras_hub_layer_whose_from_config_fails_can_be_skipped():
    vit_layers = pytest.importorskip("keras_hub.src.models.vit.vit_layers")
    inputs = keras.Input((8, 8, 3))
    x = vit_layers.ViTPatchingAndEmbedding(
        image_size=(8, 8), patch_size=(4, 4), hidden_dim=8, num_channels=3,
        name="patches")(inputs)
    model = keras.Model(inputs, _head(L.Dense(8)(x)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        qat = qat_plugin.quantize_model(model, skip=["patches"])
    x, _ = images(16, (8, 8, 3))
    qat_plugin.calibrate(qat, x)
    assert_parity(qat, qat_plugin.export_tflite(qat), x)


def test_select_tf_ops_export_with_variant_tensors_reports_sizes():
    # A skipped LSTM exports through Flex TensorList ops, whose tensors are
    # variants: the size and arena report count them 0 bytes.
    inputs = keras.Input((5, 3))
    model = keras.Model(inputs, L.Dense(2)(L.LSTM(4, name="lstm")(inputs)))
    qat = qat_plugin.quantize_model(model, skip=["lstm"])
    qat_plugin.calibrate(qat, np.random.default_rng(0).random((8, 5, 3), np.float32))
    with pytest.warns(UserWarning, match="Select TF ops"):
        data = qat_plugin.export_tflite(qat, allow_select_tf_ops=True)
    graph = read_graph(data)
    variants = [i for i, d in enumerate(graph.dtypes) if d == "variant"]
    assert variants and all(graph.nbytes(i) == 0 for i in variants)
    assert arena_plan(data).weight_bytes > 0
    assert check_target(data, "cpu", allow_select_tf_ops=True).compatible
    # inspect_tflite reads it too (its weights from the file: LiteRT
    # allocates Select TF ops only with the Flex delegate).
    report = qat_plugin.inspect_tflite(data)
    assert "FlexTensorListReserve" in [op.name for op in report.ops]
    [dense] = report.weights
    assert dense.op == "FULLY_CONNECTED" and dense.tensor.dtype == "int8"
    assert dense.values.shape == (2, 4) and np.any(dense.values != 0)
