"""PTQ export modes and calibration data: real converter, real interpreter."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import qat_plugin
from qat_plugin.tflite.interpreter import make_interpreter
from tests.conftest import images

L = keras.layers


def small_cnn():
    inputs = keras.Input((12, 12, 1), name="image")
    x = L.Conv2D(8, 3, use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU(6.0)(x)
    x = L.DepthwiseConv2D(3, padding="same")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(4)(x), name="small_cnn")


def two_input_model():
    image = keras.Input((6, 6, 1), name="image")
    extra = keras.Input((3,), name="extra")
    x = L.Flatten()(L.Conv2D(2, 3)(image))
    x = L.Concatenate()([x, L.Dense(4)(extra)])
    return keras.Model([image, extra], L.Dense(2)(x), name="two_inputs")


def compute_ops(data):
    """{op name: (input dtypes, output dtypes)} of the ops that compute."""
    report = qat_plugin.inspect_tflite(data)
    return {
        op.name: (
            sorted({t.dtype for t in op.inputs}),
            sorted({t.dtype for t in op.outputs}),
        )
        for op in report.ops
    }


@pytest.fixture(scope="module")
def model_and_data():
    keras.utils.set_random_seed(1)
    return small_cnn(), images(64)[0]


def io_types(data):
    interpreter = make_interpreter(data)
    return (
        [np.dtype(d["dtype"]).name for d in interpreter.get_input_details()],
        [np.dtype(d["dtype"]).name for d in interpreter.get_output_details()],
    )


def test_float_mode_is_float32_throughout(model_and_data):
    model, x = model_and_data
    data = qat_plugin.export_tflite(model, mode="float")
    assert io_types(data) == (["float32"], ["float32"])
    ops = compute_ops(data)
    assert set(ops) == {"CONV_2D", "DEPTHWISE_CONV_2D", "MEAN", "FULLY_CONNECTED"}
    assert all(types == (["float32"], ["float32"]) or "int32" in types[0]
               for types in ops.values())
    np.testing.assert_allclose(
        qat_plugin.TFLiteModel(data).predict(x), model.predict(x, verbose=0), atol=1e-5
    )


def test_dynamic_mode_has_int8_weights_and_float_activations():
    # The converter quantizes only weights of 1024 elements or more.
    model = keras.Sequential([keras.Input((64,)), L.Dense(32, name="wide"), L.Dense(4, name="narrow")])
    x = np.random.default_rng(0).random((16, 64), np.float32)
    data = qat_plugin.export_tflite(model, mode="dynamic")
    assert io_types(data) == (["float32"], ["float32"])
    report = qat_plugin.inspect_tflite(data)
    wide, narrow = [op for op in report.ops if op.name == "FULLY_CONNECTED"]
    assert [t.dtype for t in wide.inputs[:2]] == ["float32", "int8"]
    assert [t.dtype for t in narrow.inputs[:2]] == ["float32", "float32"]
    assert wide.outputs[0].dtype == narrow.outputs[0].dtype == "float32"
    assert not report.is_fully_int8
    out = qat_plugin.TFLiteModel(data).predict(x)
    assert np.abs(out - model.predict(x, verbose=0)).max() < 0.05


def test_float16_mode_stores_float16_weights(model_and_data):
    model, x = model_and_data
    data = qat_plugin.export_tflite(model, mode="float16")
    assert io_types(data) == (["float32"], ["float32"])
    report = qat_plugin.inspect_tflite(data)
    dequantize = [op for op in report.ops if op.name == "DEQUANTIZE"]
    assert dequantize and all(op.inputs[0].dtype == "float16" for op in dequantize)
    assert all(op.outputs[0].dtype == "float32" for op in dequantize)
    out = qat_plugin.TFLiteModel(data).predict(x)
    np.testing.assert_allclose(out, model.predict(x, verbose=0), atol=1e-2)


def test_int8_mode_is_fully_int8(model_and_data):
    model, x = model_and_data
    data = qat_plugin.export_tflite(model, mode="int8", representative_data=x)
    assert io_types(data) == (["int8"], ["int8"])
    report = qat_plugin.inspect_tflite(data)
    assert report.is_fully_int8
    conv = [op for op in report.ops if op.name == "CONV_2D"][0]
    assert [t.dtype for t in conv.inputs] == ["int8", "int8", "int32"]
    assert conv.inputs[1].per_channel
    out = qat_plugin.TFLiteModel(data).predict(x)
    reference = model.predict(x, verbose=0)
    assert np.mean(out.argmax(1) == reference.argmax(1)) >= 0.9


def test_int16x8_mode_has_int16_activations_int8_weights(model_and_data):
    model, x = model_and_data
    data = qat_plugin.export_tflite(model, mode="int16x8", representative_data=x)
    assert io_types(data) == (["int16"], ["int16"])
    conv = compute_ops(data)["CONV_2D"]
    assert conv[0] == ["int16", "int64", "int8"] and conv[1] == ["int16"]
    out = qat_plugin.TFLiteModel(data).predict(x)
    np.testing.assert_allclose(out, model.predict(x, verbose=0), atol=2e-3)


def same_tflite(model, representative_data, reference, steps=16):
    data = qat_plugin.export_tflite(
        model, mode="int8", representative_data=representative_data,
        calibration_steps=steps,
    )
    return data == reference


def test_calibration_sources_are_equivalent(model_and_data):
    """Array, tf.data (x and (x, y)), PyDataset and generator: the same samples."""
    model, x = model_and_data
    x = x[:16]
    reference = qat_plugin.export_tflite(
        model, mode="int8", representative_data=x, calibration_steps=16
    )

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return x[4 * index : 4 * index + 4], np.zeros(4)

    def generator():
        while True:  # Endless: reading stops at calibration_steps.
            for start in range(0, 16, 5):
                yield x[start : start + 5]

    sources = {
        "tf.data x": tf.data.Dataset.from_tensor_slices(x).batch(3),
        "tf.data (x, y)": tf.data.Dataset.from_tensor_slices((x, np.zeros(16))).batch(8),
        "PyDataset": Batches(),
        "generator": generator(),
        "list": [x],
    }
    for name, source in sources.items():
        assert same_tflite(model, source, reference), name


def test_multi_input_calibration_by_list_and_dict():
    keras.utils.set_random_seed(2)
    model = two_input_model()
    rng = np.random.default_rng(0)
    image, extra = rng.random((8, 6, 6, 1), np.float32), rng.random((8, 3), np.float32)
    by_list = qat_plugin.export_tflite(model, mode="int8", representative_data=[image, extra])
    by_dict = qat_plugin.export_tflite(
        model, mode="int8", representative_data={"extra": extra, "image": image}
    )
    streamed = qat_plugin.export_tflite(
        model, mode="int8",
        representative_data=tf.data.Dataset.from_tensor_slices(((image, extra), np.zeros(8))).batch(4),
    )
    assert by_list == by_dict == streamed
    assert qat_plugin.inspect_tflite(by_list).is_fully_int8
    with pytest.raises(ValueError, match=r"has 1 arrays but the model has 2 inputs"):
        qat_plugin.export_tflite(model, mode="int8", representative_data=image)
    with pytest.raises(ValueError, match=r"missing \['extra'\]"):
        qat_plugin.export_tflite(model, mode="int8", representative_data={"image": image})


@pytest.mark.parametrize(
    "data, message",
    [
        (np.zeros((4, 10, 12, 1), "float32"), r"input 'image' has shape \(4, 10, 12, 1\); expected \('batch', 12, 12, 1\)"),
        (np.zeros((12, 12, 1), "float32"), r"expected \('batch', 12, 12, 1\)"),
        (np.zeros((0, 12, 12, 1), "float32"), r"holds no samples"),
        (np.array([["a"] * 12] * 12), r"has dtype <U1; the model expects numbers"),
        (np.full((2, 12, 12, 1), np.nan, "float32"), r"contains 288 NaN or inf values"),
        (iter([]), r"representative_data yielded no batches"),
        ("images.npy", r"must be a NumPy array .* got str"),
    ],
)
def test_bad_calibration_data_fails_before_conversion(model_and_data, data, message, monkeypatch):
    model, _ = model_and_data

    def no_converter(*args, **kwargs):
        raise AssertionError("the converter ran")

    monkeypatch.setattr(tf.lite.TFLiteConverter, "from_concrete_functions", no_converter)
    with pytest.raises((ValueError, TypeError), match=message):
        qat_plugin.export_tflite(model, mode="int8", representative_data=data)


def test_inf_in_a_later_streamed_batch_names_the_batch(model_and_data):
    model, x = model_and_data
    bad = x[:4].copy()
    bad[1, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"representative_data \(batch 1\), input 'image' contains 1 NaN"):
        qat_plugin.export_tflite(
            model, mode="int8", representative_data=iter([x[:4], bad]), calibration_steps=8
        )


def test_integer_mode_without_data_and_unknown_mode_fail(model_and_data):
    model, _ = model_and_data
    with pytest.raises(ValueError, match="pass representative_data"):
        qat_plugin.export_tflite(model, mode="int16x8")
    with pytest.raises(ValueError, match="mode must be one of"):
        qat_plugin.export_tflite(model, mode="int4")
