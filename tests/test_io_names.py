"""Exported files name their inputs and outputs after the Keras model."""

import keras
import numpy as np
import pytest

import qat_plugin
from qat_plugin.tflite.flatbuffer import read_graph
from qat_plugin.tflite.interpreter import TFLiteModel


def _two_input_model():
    a = keras.Input((4,), name="a")
    b = keras.Input((3,), name="b")
    joined = keras.layers.Concatenate()([keras.layers.Dense(5)(a), keras.layers.Dense(5)(b)])
    outputs = {
        "logits": keras.layers.Dense(2, name="head")(joined),
        "score": keras.layers.Dense(1, name="score_head")(joined),
    }
    return keras.Model({"a": a, "b": b}, outputs)


def _inputs(n=64):
    rng = np.random.default_rng(0)
    return {
        "a": rng.uniform(-1, 1, (n, 4)).astype("float32"),
        "b": rng.uniform(-1, 1, (n, 3)).astype("float32"),
    }


@pytest.fixture(scope="module")
def qat_export():
    qat = qat_plugin.quantize_model(_two_input_model())
    qat_plugin.calibrate(qat, _inputs())
    return qat, qat_plugin.export_tflite(qat)


def test_dict_keys_name_the_inputs_and_outputs_of_qat_and_float_exports(qat_export):
    _, data = qat_export
    float_data = qat_plugin.export_tflite(_two_input_model(), mode="float")
    for exported in (data, float_data):
        graph = read_graph(exported)
        assert [graph.names[t] for t in graph.inputs] == ["a", "b"]
        assert [graph.shapes[t][1] for t in graph.inputs] == [4, 3]
        assert [graph.names[t] for t in graph.outputs] == ["logits", "score"]
        assert [graph.shapes[t][1] for t in graph.outputs] == [2, 1]


def test_dict_inputs_run_in_tflite_model_and_parity(qat_export):
    qat, data = qat_export
    x = _inputs()
    runner = TFLiteModel(data)
    swapped = {"b": x["b"], "a": x["a"]}
    np.testing.assert_array_equal(runner.predict(x)[0], runner.predict(swapped)[0])
    keras_out = qat.predict(x, verbose=0)
    for got, key in zip(runner.predict(x), ["logits", "score"]):
        step = max(np.ptp(keras_out[key]) / 255, 1e-6)
        assert np.max(np.abs(got - keras_out[key])) <= 2.01 * step
    parity = qat_plugin.measure_parity(qat, data, x)
    assert max(parity.max_error_steps) <= 2


def test_wrong_dict_keys_name_the_expected_inputs(qat_export):
    _, data = qat_export
    with pytest.raises(KeyError, match="'a'.*matches none of the given keys"):
        TFLiteModel(data).predict({"x": np.zeros((2, 4), "float32"),
                                   "b": np.zeros((2, 3), "float32")})


def test_repeated_output_layer_names_are_made_unique():
    inputs = keras.Input((4,), name="features")
    dense = keras.layers.Dense(2, name="shared")
    model = keras.Model(inputs, [dense(inputs), dense(inputs * 2.0)])
    graph = read_graph(qat_plugin.export_tflite(model, mode="float"))
    assert [graph.names[t] for t in graph.inputs] == ["features"]
    assert [graph.names[t] for t in graph.outputs] == ["shared", "shared_1"]
