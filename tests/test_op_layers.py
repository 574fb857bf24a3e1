"""PReLU, resizing, keras.ops reductions and split, Conv1D residuals, Lambda.

Real converter and LiteRT, tiny models, the default recipe, no `skip=`:
each model's QAT export is fully int8 where the converter's full-int8 PTQ
of the float model is, with the same ops and op counts (no requantize op,
no RESHAPE more), and the LiteRT outputs match the Keras QAT model's.
"""

import keras
import numpy as np
import pytest
from keras import layers as L
from keras import ops

import qat_plugin
from tests.conftest import assert_keras_round_trip, assert_parity, images


def _head(x):
    return L.Dense(4)(L.Flatten()(x))


def _conv(x, filters=4, **kwargs):
    return L.Conv2D(filters, 3, padding="same", **kwargs)(x)


def _prelu(x):
    x = L.PReLU(alpha_initializer=keras.initializers.RandomUniform(0.0, 0.5))(_conv(x))
    return L.PReLU(shared_axes=[1, 2])(_conv(x))


def _resizing(x):
    x = L.Resizing(12, 12)(_conv(x))
    return L.Resizing(20, 20, interpolation="nearest")(_conv(x))


def _upsampling(x):
    x = L.UpSampling2D(interpolation="bilinear")(_conv(x))
    return L.UpSampling2D()(_conv(x))


def _image_resize(x):
    return ops.image.resize(_conv(x), (12, 12))


def _split(x):
    # CSPDarkNet's cross-stage block: split channels, work on one half, join.
    x = _conv(x, 8, activation="relu")
    left, right = ops.split(x, 2, axis=-1)
    right = _conv(_conv(right, activation="relu"), activation="relu")
    return _conv(L.Concatenate()([left, right]), 8, activation="relu")


def _reductions(x):
    x = _conv(x, 8)
    parts = [ops.max(x, axis=-1), ops.min(x, axis=-1), ops.sum(x, axis=-1),
             ops.prod(ops.sigmoid(x), axis=-1)]
    return L.Concatenate()([ops.expand_dims(p, -1) for p in parts])


def _lambda(x):
    x = _conv(x)
    return L.Lambda(lambda t: ops.relu(t) * 0.5 + ops.max(t, axis=-1, keepdims=True),
                    name="traced")(x)


def _conv1d_residual(x):
    # keras.io speaker recognition: Conv1D blocks, a residual Add, MaxPool1D.
    for filters, convs in ((4, 2), (8, 3)):
        shortcut = L.Conv1D(filters, 1, padding="same")(x)
        for _ in range(convs - 1):
            x = L.Activation("relu")(L.Conv1D(filters, 3, padding="same")(x))
        x = L.Add()([L.Conv1D(filters, 3, padding="same")(x), shortcut])
        x = L.MaxPool1D(2, strides=2)(L.Activation("relu")(x))
    return L.AveragePooling1D(3, strides=3)(x)


CASES = {
    "prelu": (_prelu, (8, 8, 2)),
    "resizing": (_resizing, (8, 8, 2)),
    "upsampling": (_upsampling, (8, 8, 2)),
    "image_resize": (_image_resize, (8, 8, 2)),
    "split": (_split, (8, 8, 2)),
    "reductions": (_reductions, (8, 8, 2)),
    "lambda": (_lambda, (8, 8, 2)),
    "conv1d_residual": (_conv1d_residual, (32, 3)),
}


def _model(name):
    body, shape = CASES[name]
    inputs = keras.Input(shape)
    return keras.Model(inputs, _head(body(inputs)), name=name)


def _quantized(name):
    model = _model(name)
    x, _ = images(32, model.inputs[0].shape[1:])
    qat = qat_plugin.quantize_model(model)
    qat_plugin.calibrate(qat, x)
    return model, qat, x


@pytest.mark.parametrize("name", sorted(CASES))
def test_exports_the_ops_of_ptq_fully_int8_with_parity(name):
    model, qat, x = _quantized(name)
    ptq = qat_plugin.inspect_tflite(
        qat_plugin.export_tflite(model, representative_data=x)
    )
    data = qat_plugin.export_tflite(qat)
    report = qat_plugin.inspect_tflite(data)
    assert ptq.is_fully_int8
    assert report.is_fully_int8, report.float_ops
    assert dict(report.op_counts) == dict(ptq.op_counts)
    assert_parity(qat, data, x)


def test_prelu_alpha_is_int8_with_the_ptq_layout():
    # The converter writes PRELU's alpha with one scale (PTQ too): QAT
    # fake-quantizes it per tensor, so it trains on the exported values.
    from ai_edge_litert.interpreter import Interpreter

    model, qat, x = _quantized("prelu")
    data = qat_plugin.export_tflite(qat)
    assert [op.name for op in qat_plugin.inspect_tflite(data).ops].count("PRELU") == 2
    interpreter = Interpreter(model_content=data)
    details = interpreter.get_tensor_details()
    alphas = [t for t in details if tuple(t["shape"]) in ((8, 8, 4), (1, 1, 4))]
    assert len(alphas) == 2
    for alpha in alphas:
        assert alpha["dtype"] == np.int8
        assert len(alpha["quantization_parameters"]["scales"]) == 1


def test_lambda_of_keras_ops_quantizes_as_its_ops():
    _, qat, _ = _quantized("lambda")
    names = {type(layer).__name__ for layer in qat.layers}
    assert "Lambda" not in names and "OperationLayer" in names


@pytest.mark.parametrize("name", ["prelu", "lambda"])
def test_keras_round_trip(name, tmp_path):
    _, qat, x = _quantized(name)
    assert_keras_round_trip(qat, x, tmp_path / f"{name}.keras")


def test_conv1d_trains_as_it_exports():
    model, qat, x = _quantized("conv1d_residual")
    y = np.arange(len(x)) % 4
    qat.compile(keras.optimizers.Adam(1e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert_parity(qat, qat_plugin.export_tflite(qat), x)
