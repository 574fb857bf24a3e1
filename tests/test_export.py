"""export_tflite and inspect_tflite: real converter, real interpreter."""

import os

import keras
import numpy as np
import pytest

import qat_plugin
from qat_plugin.quantizers import integer_weight
from tests.conftest import assert_parity, images, qat_fit

L = keras.layers


def sequential_cnn():
    return keras.Sequential(
        [
            keras.Input((12, 12, 1)),
            L.Conv2D(8, 3, use_bias=False),
            L.BatchNormalization(),
            L.ReLU(),
            L.MaxPooling2D(),
            L.Conv2D(8, 3, activation="relu"),
            L.Flatten(),
            L.Dropout(0.2),
            L.Dense(4),
        ]
    )


def residual_block():
    inputs = keras.Input((12, 12, 1))
    x = L.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    y = L.Conv2D(8, 3, padding="same", use_bias=False)(x)
    y = L.BatchNormalization()(y)
    x = L.ReLU()(L.Add()([x, y]))
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(4)(x))


def concatenate_branch():
    inputs = keras.Input((12, 12, 1))
    x = L.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    a = L.Conv2D(4, 1, activation="relu")(x)
    b = L.Conv2D(4, 3, padding="same")(x)
    x = L.Concatenate()([a, b])
    x = L.AveragePooling2D(2)(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(4)(x))


def depthwise_separable():
    inputs = keras.Input((12, 12, 1))
    x = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU(6.0)(x)
    x = L.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU(6.0)(x)
    x = L.SeparableConv2D(8, 3, padding="same", activation="relu")(x)
    x = L.ZeroPadding2D(1)(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(4)(x))


def standalone_batch_norm():
    inputs = keras.Input((12, 12, 1))
    x = L.Conv2D(8, 3, activation="relu")(inputs)
    y = L.Conv2D(8, 3, padding="same")(x)
    x = L.Add()([x, y])
    x = L.BatchNormalization()(x)  # pre-activation style: nothing to fold into
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(4)(x))


def nested_model():
    block = keras.Sequential(
        [keras.Input((12, 12, 8)), L.Conv2D(8, 3, padding="same"), L.BatchNormalization(), L.ReLU()],
        name="block",
    )
    inputs = keras.Input((12, 12, 1))
    x = L.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = block(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(4)(x))


def multi_input():
    image = keras.Input((12, 12, 1), name="image")
    features = keras.Input((5,), name="features")
    x = L.GlobalAveragePooling2D()(L.Conv2D(6, 3, activation="relu")(image))
    y = L.Dense(6, activation="relu")(features)
    return keras.Model([image, features], L.Dense(4)(L.Concatenate()([x, y])))


ARCHITECTURES = {
    "sequential_cnn": sequential_cnn,
    "residual_block": residual_block,
    "concatenate_branch": concatenate_branch,
    "depthwise_separable": depthwise_separable,
    "standalone_batch_norm": standalone_batch_norm,
    "nested_model": nested_model,
    "multi_input": multi_input,
}


def data_for(model, n=128):
    x, y = images(n)
    if len(model.inputs) == 1:
        return x, y
    return [x, np.random.default_rng(1).random((n, 5), dtype=np.float32)], y


def trained_float(build):
    model = build()
    x, y = data_for(model)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    return model, x, y


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_qat_export_is_fully_int8_matches_ptq_ops_and_keras(name):
    model, x, y = trained_float(ARCHITECTURES[name])
    qat = qat_fit(model, x, y)
    data = qat_plugin.export_tflite(qat)
    report = qat_plugin.inspect_tflite(data)
    assert report.is_fully_int8, report.summary()
    assert not report.float_ops and not report.conversion_ops
    ptq = qat_plugin.inspect_tflite(qat_plugin.export_tflite(model, representative_data=x))
    assert report.op_counts == ptq.op_counts, (report.op_counts, ptq.op_counts)
    assert_parity(qat, data, x)


def test_exported_int8_weights_are_the_trained_ones():
    model, x, y = trained_float(sequential_cnn)
    qat = qat_fit(model, x, y)
    report = qat_plugin.inspect_tflite(qat_plugin.export_tflite(qat))
    conv = qat.layers[2]  # FakeQuant(input) comes first
    assert isinstance(conv, qat_plugin.QuantizedLinear) and conv.batch_norm is not None
    folded = conv._float_kernels()[0]
    values, scales = integer_weight(folded, (0, 1, 2))
    first_conv = report.ops[0]
    assert first_conv.name == "CONV_2D"
    weight = first_conv.inputs[1]
    assert weight.dtype == "int8" and weight.per_channel and weight.quantized_dimension == 0
    np.testing.assert_allclose(weight.scales, scales.reshape(-1), rtol=1e-5)
    runner = qat_plugin.TFLiteModel(qat_plugin.export_tflite(qat), use_xnnpack=False)
    exported = runner.interpreter.get_tensor(weight.index)  # [out, h, w, in]
    np.testing.assert_array_equal(exported, np.transpose(values, (3, 0, 1, 2)))


def test_export_writes_path_atomically_and_returns_bytes(tmp_path):
    model, x, y = trained_float(sequential_cnn)
    qat = qat_fit(model, x, y)
    path = tmp_path / "model.tflite"
    data = qat_plugin.export_tflite(qat, path)
    assert path.read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == ["model.tflite"]
    report = qat_plugin.inspect_tflite(path)
    assert report.size_bytes == len(data)


def test_export_into_missing_folder_fails_before_writing(tmp_path):
    model, x, y = trained_float(sequential_cnn)
    qat = qat_fit(model, x, y)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qat_plugin.export_tflite(qat, tmp_path / "missing" / "m.tflite")


def test_export_before_any_data_names_the_unobserved_layers():
    qat = qat_plugin.quantize_model(sequential_cnn())
    with pytest.raises(qat_plugin.ExportError, match="never observed.*fit\\(\\)"):
        qat_plugin.export_tflite(qat)


def test_float_export_of_a_float_model_lists_float_ops():
    model, x, _ = trained_float(sequential_cnn)
    report = qat_plugin.inspect_tflite(qat_plugin.export_tflite(model))
    assert not report.is_fully_int8
    assert {op.name for op in report.float_ops} >= {"CONV_2D", "FULLY_CONNECTED"}


def test_qat_model_refuses_ptq_modes():
    model, x, y = trained_float(sequential_cnn)
    qat = qat_fit(model, x, y)
    with pytest.raises(ValueError, match="QAT model"):
        qat_plugin.export_tflite(qat, mode="float16")


def test_inspect_rejects_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No .tflite file"):
        qat_plugin.inspect_tflite(tmp_path / "nope.tflite")


def test_int16x8_export_with_fixed_range_softmax_matches_keras():
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), L.Conv2D(4, 3, activation="relu"),
         L.GlobalAveragePooling2D(), L.Dense(5), L.Softmax()]
    )
    x = np.random.default_rng(0).random((64, 8, 8, 1), dtype=np.float32)
    qat = qat_plugin.quantize_model(model, recipe="int16x8")
    qat_plugin.calibrate(qat, x)
    data = qat_plugin.export_tflite(qat)
    runner = qat_plugin.TFLiteModel(data)
    assert runner.output_details[0]["dtype"] == np.int16
    assert runner.output_details[0]["quantization"] == (1 / 32768, 0)
    assert_parity(qat, data, x)


def test_a_constant_input_and_a_dead_relu_export_and_match_keras():
    # A zero-range activation (constant input, a ReLU that is always 0)
    # used to read as "never observed" and could never be exported.
    inputs = keras.Input((4,), name="x")
    dead = keras.layers.Dense(3, kernel_initializer="ones", name="dead",
                              bias_initializer=keras.initializers.Constant(-100.0))(inputs)
    dead = keras.layers.ReLU(name="relu")(dead)
    outputs = keras.layers.Dense(2, name="head")(keras.layers.Concatenate()([dead, inputs]))
    qat = qat_plugin.quantize_model(keras.Model(inputs, outputs))
    x = np.random.default_rng(0).random((64, 4), dtype=np.float32)
    qat_plugin.calibrate(qat, x)
    data = qat_plugin.export_tflite(qat)
    assert qat_plugin.inspect_tflite(data).is_fully_int8
    assert_parity(qat, data, x)
    zeros = np.zeros((8, 4), "float32")
    constant = qat_plugin.quantize_model(
        keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="head")]))
    qat_plugin.calibrate(constant, zeros)
    np.testing.assert_allclose(
        qat_plugin.TFLiteModel(qat_plugin.export_tflite(constant)).predict(zeros),
        constant.predict(zeros, verbose=0), atol=0.02)


def test_nonfinite_training_batches_warn_naming_the_layers_and_keep_the_ranges():
    model = keras.Sequential([keras.Input((4,), name="x"), keras.layers.Dense(2, name="head")])
    qat = qat_plugin.quantize_model(model)
    x = np.random.default_rng(1).random((32, 4), dtype=np.float32)
    qat(x, training=True)

    def ranges():
        return {w.path: float(w.numpy()) for w in qat.non_trainable_weights
                if w.path.endswith(("_min", "_max"))}

    before = ranges()
    bad = x.copy()
    bad[3, 1] = np.nan
    qat(bad, training=True)
    assert len(before) == 4 and ranges() == before
    assert qat_plugin.quantize.calibration.nonfinite_batches(qat) == {"x_quantize": 1, "head": 1}
    with pytest.warns(UserWarning, match=r"export_tflite: .*skipped batches holding NaN or inf"
                                         r".*'head': 1.*TerminateOnNaN"):
        assert qat_plugin.inspect_tflite(qat_plugin.export_tflite(qat)).is_fully_int8
    # Only NaN ever seen: the export says so instead of "never observed".
    fresh = qat_plugin.quantize_model(model)
    fresh(bad, training=True)
    with pytest.warns(UserWarning), pytest.raises(
            qat_plugin.ExportError, match="saw only batches holding NaN or inf"):
        qat_plugin.export_tflite(fresh)


def test_keras_litert_export_of_a_qat_model_writes_the_int8_file(tmp_path):
    qat = qat_fit(sequential_cnn(), *images(64))
    path = tmp_path / "keras.tflite"
    qat.export(str(path), format="litert", verbose=False)
    assert path.read_bytes() == qat_plugin.export_tflite(qat)
    assert qat_plugin.inspect_tflite(str(path)).is_fully_int8
    # After a save/load round trip too; converter settings are refused.
    qat.save(tmp_path / "qat.keras")
    loaded = keras.models.load_model(tmp_path / "qat.keras")
    assert isinstance(loaded, qat_plugin.QATModel)
    loaded.export(str(tmp_path / "loaded.tflite"), format="litert", verbose=False)
    assert (tmp_path / "loaded.tflite").read_bytes() == path.read_bytes()
    with pytest.raises(qat_plugin.ExportError, match="takes no converter settings "
                                                     r"\(optimizations given\).*export_tflite"):
        loaded.export(str(tmp_path / "x.tflite"), format="litert", optimizations=[])
    assert not (tmp_path / "x.tflite").exists()


def test_a_qat_export_graph_holds_constants_only():
    # Ranges, schedule switches and range-group unions are read before
    # tracing: the graph converted has no variable to freeze.
    from qat_plugin.layers.base import quantized_layers
    from qat_plugin.layers.modes import export_mode
    from qat_plugin.tflite.convert import _frozen_function
    from qat_plugin.tflite.input_shapes import export_input_specs

    inputs = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    b = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 1)(inputs))
    x = keras.layers.Concatenate()([a, b, keras.layers.MaxPooling2D(1)(inputs)])
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
    qat = qat_plugin.quantize_model(model)
    data, _ = images(16, (8, 8, 3))
    qat(data, training=True)
    for layer in quantized_layers(qat):
        layer.prepare_export()
    with export_mode():
        function = _frozen_function(qat, export_input_specs(qat))
    assert list(function.captured_inputs) == []
    ops_in_graph = {node.op for node in function.graph.as_graph_def().node}
    assert not ops_in_graph & {"ReadVariableOp", "GreaterEqual", "Minimum", "Maximum"}
    exported = qat_plugin.export_tflite(qat)
    assert qat_plugin.inspect_tflite(exported).is_fully_int8
    assert_parity(qat, exported, data)
