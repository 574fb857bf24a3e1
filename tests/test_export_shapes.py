"""Inputs of undefined size export with the fixed shape given by `input_shape=`.

Real converter and LiteRT: a `(None, None, 3)` image model and a `(None,)`
token model, as vision and sequence models have them, QAT and PTQ.
"""

import keras
import numpy as np
import pytest

import qat_plugin
from qat_plugin.errors import ExportError
from qat_plugin.tflite.input_shapes import export_input_specs
from qat_plugin.tflite.interpreter import TFLiteModel
from tests.conftest import assert_parity

L = keras.layers
VOCAB = 20


def any_size_cnn():
    inputs = keras.Input((None, None, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = L.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(4)(x))


def token_model():
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = L.GlobalAveragePooling1D()(L.Embedding(VOCAB, 8)(tokens))
    return keras.Model(tokens, L.Dense(3)(x))


def two_input_model():
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    features = keras.Input((None, 4), name="features")
    a = L.GlobalAveragePooling1D()(L.Embedding(VOCAB, 8)(tokens))
    b = L.GlobalAveragePooling1D()(L.Dense(8, activation="relu")(features))
    outputs = L.Dense(3)(L.Concatenate()([a, b]))
    return keras.Model({"tokens": tokens, "features": features}, outputs)


def image_batch(n=64, size=16):
    return np.random.default_rng(0).uniform(0, 1, (n, size, size, 3)).astype("float32")


def token_batch(n=64, length=12):
    return np.random.default_rng(1).integers(0, VOCAB, (n, length)).astype("int32")


def two_input_batch(n=64):
    features = np.random.default_rng(2).normal(size=(n, 6, 4)).astype("float32")
    return {"tokens": token_batch(n), "features": features}


def calibrated(model, x):
    qat = qat_plugin.quantize_model(model)
    qat_plugin.calibrate(qat, x)
    return qat


def input_details(data):
    return [
        (d["name"], d["shape"].tolist(), d["shape_signature"].tolist(), np.dtype(d["dtype"]).name)
        for d in TFLiteModel(data).input_details
    ]


@pytest.fixture(scope="module")
def cnn_export():
    x = image_batch()
    qat = calibrated(any_size_cnn(), x)
    return qat, qat_plugin.export_tflite(qat, input_shape=(16, 16, 3)), x


def test_any_size_image_model_exports_fully_int8_at_the_given_size(cnn_export):
    qat, data, x = cnn_export
    assert input_details(data) == [("image", [1, 16, 16, 3], [-1, 16, 16, 3], "int8")]
    report = qat_plugin.inspect_tflite(data)
    assert report.is_fully_int8, report.summary()
    assert_parity(qat, data, x)
    assert TFLiteModel(data).predict(x[:5]).shape == (5, 4)


def test_data_of_another_size_is_refused_naming_the_input(cnn_export):
    _, data, _ = cnn_export
    with pytest.raises(ValueError, match=r"'image'.*fixed shape \(batch, 16, 16, 3\).*"
                                         r"\(2, 8, 8, 3\).*input_shape="):
        TFLiteModel(data).predict(image_batch(2, size=8))
    with pytest.raises(ValueError, match=r"'image'.*\(2, 8, 8, 3\)"):
        qat_plugin.measure_parity(cnn_export[0], data, image_batch(2, size=8))


def test_ptq_baseline_takes_the_same_input_shape():
    model, x = any_size_cnn(), image_batch(32)
    data = qat_plugin.export_tflite(model, mode="int8", representative_data=x,
                                    calibration_steps=32, input_shape=(16, 16, 3))
    assert input_details(data) == [("image", [1, 16, 16, 3], [-1, 16, 16, 3], "int8")]
    assert qat_plugin.inspect_tflite(data).is_fully_int8
    # Calibration data is checked against the fixed shape, not the model's Nones.
    with pytest.raises(ValueError, match=r"representative_data, input 'image' has shape "
                                         r"\(4, 8, 8, 3\); expected \('batch', 16, 16, 3\)"):
        qat_plugin.export_tflite(model, mode="int8", representative_data=image_batch(4, 8),
                                 input_shape=(16, 16, 3))


def test_token_model_gets_a_fixed_length_int32_input():
    x = token_batch()
    qat = calibrated(token_model(), x)
    data = qat_plugin.export_tflite(qat, input_shape=(12,))
    assert input_details(data) == [("tokens", [1, 12], [-1, 12], "int32")]
    report = qat_plugin.inspect_tflite(data)
    assert not report.float_ops, report.summary()
    parity = qat_plugin.measure_parity(qat, data, x)
    assert parity.max_error_steps[0] <= 2 + 1e-4
    with pytest.raises(ValueError, match=r"'tokens'.*fixed shape \(batch, 12\).*\(64, 10\)"):
        TFLiteModel(data).predict(x[:, :10])
    with pytest.raises(ValueError, match="'tokens'.*non-integral floats"):
        TFLiteModel(data).predict(x + 0.5)
    ptq = qat_plugin.export_tflite(token_model(), mode="int8", representative_data=x,
                                   calibration_steps=16, input_shape=(12,))
    assert input_details(ptq) == [("tokens", [1, 12], [-1, 12], "int32")]


@pytest.mark.parametrize("kind", ["qat", "float", "ptq"])
def test_missing_input_shape_names_the_input(kind):
    model, kwargs = token_model(), {}
    if kind == "qat":
        model = calibrated(model, token_batch(8))
    elif kind == "float":
        kwargs = {"mode": "float"}
    else:  # Calibration data does not stand in for input_shape.
        kwargs = {"representative_data": token_batch(8)}
    with pytest.raises(ExportError, match=r"Input 'tokens' of model .* undefined shape "
                                          r"\(batch, None\).*Pass input_shape=.*\(128,\)"):
        qat_plugin.export_tflite(model, **kwargs)


@pytest.mark.parametrize("input_shape, message", [
    ((16, 16), r"input_shape=\(16, 16\) has 2 dimensions but input 'image' has 3"),
    ((1, 16, 16, 3), "includes the batch axis"),
    ((16, 16, 4), r"conflicts with input 'image'.*dimension 3 is 3 in the model, 4 given"),
    ((0, 16, 3), "dimension 1 is 0; every size must be a positive int"),
    ((16, None, 3), "dimension 2 is None"),
    ((16.0, 16, 3), "dimension 1 is 16.0"),
    ("16x16", "input_shape must be a shape tuple"),
    ({"pixels": (16, 16, 3)}, r"\['pixels'\] name no input .* its inputs are \['image'\]"),
    ([(16, 16, 3), (16, 16, 3)], "lists 2 shapes but model .* has 1 inputs"),
])
def test_bad_input_shape_is_refused_naming_the_argument(input_shape, message):
    with pytest.raises(ExportError, match=message):
        qat_plugin.export_tflite(any_size_cnn(), mode="float", input_shape=input_shape)


def test_several_inputs_take_a_dict_or_a_list():
    model = two_input_model()
    by_name = {"tokens": (12,), "features": (6, 4)}
    assert [s.shape for s in export_input_specs(model, by_name)] == [(6, 4), (12,)]
    assert [s.shape for s in export_input_specs(model, [(6, 4), (12,)])] == [(6, 4), (12,)]
    with pytest.raises(ExportError, match=r"one shape, but model .* has 2 inputs"):
        export_input_specs(model, (12,))
    with pytest.raises(ExportError, match=r"Input 'features' .*\(batch, None, 4\)"):
        export_input_specs(model, {"tokens": (12,)})
    with pytest.raises(ExportError, match=r"input_shape for input 'tokens'=\(12, 2\)"):
        export_input_specs(model, {"tokens": (12, 2), "features": (6, 4)})

    x = two_input_batch()
    qat = calibrated(model, x)
    data = qat_plugin.export_tflite(qat, input_shape=by_name)
    assert sorted(input_details(data)) == [
        # Mixed float and int32 inputs keep float input (as before).
        ("features", [1, 6, 4], [-1, 6, 4], "float32"),
        ("tokens", [1, 12], [-1, 12], "int32"),
    ]
    runner = TFLiteModel(data)
    np.testing.assert_array_equal(runner.predict(x), runner.predict(dict(reversed(x.items()))))
    parity = qat_plugin.measure_parity(qat, data, x)
    assert parity.max_error_steps[0] <= 2 + 1e-4
    with pytest.raises(ValueError, match=r"'features'.*fixed shape \(batch, 6, 4\)"):
        runner.predict({"tokens": x["tokens"], "features": x["features"][:, :3]})


def test_fixed_shape_models_export_as_before_and_accept_a_matching_shape():
    model = keras.Sequential([keras.Input((4,), name="x"), L.Dense(2)])
    assert qat_plugin.export_tflite(model, mode="float", input_shape=(4,)) == \
        qat_plugin.export_tflite(model, mode="float")


@pytest.fixture(scope="module")
def token_qat():
    x = token_batch()
    return calibrated(token_model(), x), x


def test_keras_litert_export_takes_an_input_signature(token_qat, tmp_path):
    qat, _ = token_qat
    expected = qat_plugin.export_tflite(qat, input_shape=(12,))
    qat.export(str(tmp_path / "sig.tflite"), format="litert", verbose=False,
               input_signature=[keras.InputSpec(shape=(None, 12), dtype="int32")])
    assert (tmp_path / "sig.tflite").read_bytes() == expected
    qat.export(str(tmp_path / "shape.tflite"), format="litert", verbose=False,
               input_shape=(12,))
    assert (tmp_path / "shape.tflite").read_bytes() == expected
    with pytest.raises(ExportError, match="Input 'tokens'.*Pass input_shape="):
        qat.export(str(tmp_path / "none.tflite"), format="litert", verbose=False)
    with pytest.raises(ExportError, match="input_signature.*dimension 1 is None"):
        qat.export(str(tmp_path / "none.tflite"), format="litert", verbose=False,
                   input_signature=[keras.InputSpec(shape=(None, None), dtype="int32")])
    assert not (tmp_path / "none.tflite").exists()


def test_callback_compare_and_cli_take_the_input_shape(token_qat, tmp_path, capsys):
    from qat_plugin.callbacks import TFLiteExport
    from qat_plugin_cli import main

    qat, x = token_qat
    y = x[:, 0] % 3
    qat.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ExportError, match="Input 'tokens'"):  # Before the first epoch.
        qat.fit(x, y, epochs=1, verbose=0, callbacks=[TFLiteExport(str(tmp_path / "a.tflite"))])
    export = TFLiteExport(str(tmp_path / "b.tflite"), validation_data=(x, y), input_shape=(12,))
    qat.fit(x, y, epochs=1, verbose=0, callbacks=[export])
    assert input_details((tmp_path / "b.tflite").read_bytes())[0][1] == [1, 12]
    assert export.int8_accuracy is not None and export.get_config()["input_shape"] == (12,)

    model = token_model()
    report = qat_plugin.analysis.compare(model, qat, eval_data=(x, y), modes=("float",),
                                         latency_runs=1, warmup_runs=0, input_shape=(12,))
    assert [row.name for row in report.rows] == ["float", "qat-int8"]
    with pytest.raises(ExportError, match="Input 'tokens'"):
        qat_plugin.analysis.compare(model, eval_data=(x, y), modes=("float",))

    model.save(tmp_path / "tokens.keras")
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    command = ["compare", str(tmp_path / "tokens.keras"), "--data", str(tmp_path / "eval.npz"),
               "--modes", "float", "--latency-runs", "1"]
    assert main(command) == 1
    err = capsys.readouterr().err
    assert "Input 'tokens'" in err and "--input-shape NAME=16,16,3" in err
    assert main(command + ["--input-shape", "tokens=12"]) == 0
    assert "| float |" in capsys.readouterr().out
