"""Each layer kind keras.applications needs, in a small model, exported.

Every case runs quantize_model, calibrate and export_tflite, then checks
the .tflite in the LiteRT interpreter: fully int8, no more ops than the
converter's own full-int8 PTQ of the float model, and parity with the Keras
QAT model (top-1 agreement >= 99%, outputs within 2 quantization steps).
"""

import keras
import numpy as np
import pytest
from keras import layers as L
from keras.src.applications.convnext import LayerScale
from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

import qat_plugin
from tests.conftest import assert_keras_round_trip, assert_parity

SHAPE = (12, 12, 3)


def _head(x):
    return L.Dense(5)(L.GlobalAveragePooling2D()(x))


def _conv(x, filters=8, kernel=3, **kwargs):
    return L.Conv2D(filters, kernel, padding="same", **kwargs)(x)


def _activation_layers(x):
    x = _conv(x)
    for name in ("swish", "hard_silu", "gelu", "sigmoid", "tanh"):
        x = _conv(L.Activation(name)(x), kernel=1)
    return L.Softmax()(_head(x))


def _activation_arguments(x):
    x = _conv(x, activation="silu")
    x = _conv(x, kernel=1, activation="hard_swish")
    x = _conv(x, kernel=1, activation="gelu")
    x = L.Dense(6, activation="tanh")(L.GlobalAveragePooling2D()(x))
    return L.Dense(5, activation="sigmoid")(x)


def _ops_hard_sigmoid(x):
    # MobileNetV3's squeeze-excite gate, recorded as keras.ops nodes.
    x = _conv(x)
    gate = L.ReLU(6.0)(_conv(x, kernel=1) + 3.0) * (1.0 / 6.0)
    return _head(L.Multiply()([x, gate]))


def _ops_activations(x):
    x = keras.ops.silu(_conv(x))
    x = keras.ops.sigmoid(_conv(x, kernel=1))
    x = keras.ops.tanh(_conv(x, kernel=1))
    return _head(keras.ops.relu(_conv(x, kernel=1)))


def _squeeze_excite(x):
    x = _conv(x, activation="relu")
    se = L.GlobalAveragePooling2D(keepdims=True)(x)
    se = L.Conv2D(4, 1, activation="relu")(se)
    se = L.Conv2D(8, 1, activation="sigmoid")(se)
    return _head(L.Multiply()([x, se]))


def _preprocessing(x):
    x = L.Rescaling(1.0 / 255)(x)
    x = L.Normalization(mean=[0.4, 0.5, 0.6], variance=[0.05, 0.06, 0.07])(x)
    return _head(_conv(L.ZeroPadding2D()(x)))


def _scalar_rescaling(x):
    # EfficientNet's stem (weights=None): x / 255, an identity
    # Normalization, padding, conv. The converter folds a scalar scale into
    # the kernel of the op reading it, mid-network too: no MUL is left.
    x = L.Rescaling(1.0 / 255)(x)
    x = L.Normalization(mean=0.0, variance=1.0)(x)
    x = L.ZeroPadding2D()(x)
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3)(x)))
    return _head(L.DepthwiseConv2D(3)(L.Rescaling(-0.5)(x)))


def _rescaling_offset(x):
    return _head(_conv(L.Rescaling(1.0 / 127.5, offset=-1.0)(x)))


def _reshaping(x):
    x = _conv(x, activation="relu")
    x = L.UpSampling2D()(L.Cropping2D(((1, 0), (1, 0)))(x))
    x = L.Permute((2, 1, 3))(x)
    return _head(L.UpSampling2D(interpolation="bilinear")(x))


def _elementwise(x):
    # MAXIMUM / MINIMUM keep one scale for inputs and output: producers
    # and output quantize with one shared range (clipped as on the device).
    x = _conv(x)
    c = L.Maximum()([_conv(x, kernel=1), _conv(x, kernel=1)])
    d = L.Subtract()([c, _conv(c, kernel=1)])
    e = L.Minimum()([_conv(d, kernel=1), _conv(d, kernel=1)])
    return _head(e)


def _layer_scale(x):
    a = _conv(x)
    b = LayerScale(0.5, 8)(_conv(a, kernel=1))
    return _head(keras.ops.add(a, b))


def _custom_scale(x):
    a = _conv(x, activation="relu")
    b = _conv(a, kernel=1)
    return _head(L.Activation("relu")(CustomScaleLayer(0.2)([a, b])))


def _dense_block(x):
    # DenseNet: each concatenation feeds the next one and a pre-activation
    # BatchNormalization; the block shares one scale, no requantize.
    x = _conv(x, activation="relu")
    for _ in range(3):
        branch = L.ReLU()(L.BatchNormalization()(x))
        x = L.Concatenate()([x, _conv(branch, filters=4)])
    return _head(L.ReLU()(L.BatchNormalization()(x)))


def _pooled_concatenation(x):
    # DenseNet's transition (conv, average pooling) into a dense block and
    # Inception's reduction (a max-pooled branch concatenated): a pooled
    # tensor read by other ops too. The chain exports with one scale.
    x = _conv(x, activation="relu")
    pooled = L.AveragePooling2D(2)(x)
    branch = _conv(L.ReLU()(L.BatchNormalization()(pooled)), filters=4)
    x = L.Concatenate()([pooled, branch])
    branch = L.Conv2D(4, 3, strides=2)(x)
    return _head(L.Concatenate()([branch, L.MaxPooling2D(3, strides=2)(x)]))


def _split_and_reductions(x):
    # CSPDarkNet-style channel split; max/min reductions over space.
    a, b = keras.ops.split(_conv(x), 2, axis=-1)
    a = keras.ops.max(_conv(a, 4, 1, activation="relu"), axis=(1, 2))
    b = keras.ops.min(_conv(b, 4, 1), axis=(1, 2))
    return L.Dense(5)(L.Concatenate()([a, b]))


CASES = {
    "dense_block": _dense_block,
    "pooled_concatenation": _pooled_concatenation,
    "activation_layers": _activation_layers,
    "activation_arguments": _activation_arguments,
    "ops_hard_sigmoid": _ops_hard_sigmoid,
    "ops_activations": _ops_activations,
    "squeeze_excite": _squeeze_excite,
    "preprocessing": _preprocessing,
    "rescaling_offset": _rescaling_offset,
    "scalar_rescaling": _scalar_rescaling,
    "reshaping": _reshaping,
    "elementwise": _elementwise,
    "layer_scale": _layer_scale,
    "custom_scale": _custom_scale,
    "split_and_reductions": _split_and_reductions,
}


def _pixels(n=48, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n,) + SHAPE).astype("float32")


def _model(case):
    inputs = keras.Input(SHAPE)
    return keras.Model(inputs, CASES[case](inputs), name=case)


def _export(case):
    model = _model(case)
    x = _pixels()
    if not any(isinstance(l, (L.Rescaling, L.Normalization)) for l in model.layers):
        x = x / 127.5 - 1.0
    qat = qat_plugin.quantize_model(model)
    assert qat_plugin.calibrate(qat, x, batch_size=16) == 3
    data = qat_plugin.export_tflite(qat)
    return model, qat, x, data


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_kind_exports_fully_int8_with_parity(case):
    model, qat, x, data = _export(case)
    report = qat_plugin.inspect_tflite(data)
    assert report.is_fully_int8, [op.name for op in report.float_ops]
    ptq = qat_plugin.inspect_tflite(
        qat_plugin.export_tflite(model, representative_data=x)
    )
    assert len(report.ops) <= len(ptq.ops), (report.op_counts, ptq.op_counts)
    assert_parity(qat, data, x)
    # Each op, fed the interpreter's inputs: one step of tie rounding. A
    # Normalization is two int8 ops (SUB, MUL), run rather than compared:
    # its own step shows in the op after it.
    local = qat_plugin.measure_local_parity(qat, data, x)
    bound = 2.0 if case == "preprocessing" else 1.0
    assert local.max_error_steps <= bound + 1e-3, str(local)


def test_scalar_rescaling_folds_into_the_kernels_reading_it():
    _, qat, _, data = _export("scalar_rescaling")
    assert "MUL" not in qat_plugin.inspect_tflite(data).op_counts
    assert not any(type(l).__name__ == "QuantizedAffine" for l in qat.layers)


@pytest.mark.parametrize(
    "case", ["ops_hard_sigmoid", "layer_scale", "custom_scale", "scalar_rescaling"]
)
def test_folded_constants_keep_the_float_function(case):
    # Scales and shifts folded into the Conv/Dense before them: before
    # quantization starts the QAT model computes the float model's function.
    model = _model(case)
    x = _pixels(16) / 127.5 - 1.0
    qat = qat_plugin.quantize_model(model)
    for layer in qat.layers:
        if isinstance(layer, qat_plugin.QuantizedLayer):
            layer.set_qat_schedule([2**31 - 1, 2**31 - 1, 2**31 - 1])
    np.testing.assert_allclose(
        qat.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4,
        atol=1e-5,
    )


def test_concatenation_chain_exports_one_scale_and_stays_shared_when_loaded(
    tmp_path,
):
    _, qat, x, data = _export("pooled_concatenation")
    report = qat_plugin.inspect_tflite(data)
    assert "QUANTIZE" not in report.op_counts
    interpreter = qat_plugin.tflite.interpreter.make_interpreter(data)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    chain = {
        tensors[i]["quantization"]
        for op in interpreter._get_ops_details()
        if op["op_name"] in ("CONCATENATION", "AVERAGE_POOL_2D", "MAX_POOL_2D")
        for i in list(op["inputs"]) + list(op["outputs"])
    }
    assert len(chain) == 1, chain
    members = [l for l in qat.layers if getattr(l, "range_group", None)]
    assert len({id(l.range_group) for l in members}) == 1
    restored = assert_keras_round_trip(qat, x, tmp_path / "chain.keras")
    members = [l for l in restored.layers if getattr(l, "range_group", None)]
    assert len(members) == 6
    assert all(l.range_group is members[0].range_group for l in members)
    assert qat_plugin.export_tflite(restored) == data


def test_new_layer_kinds_round_trip_through_keras_file(tmp_path):
    # OperationLayer, QuantizedSwish, QuantizedAffine and the folds.
    inputs = keras.Input(SHAPE)
    x = L.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    x = _conv(x, activation="swish")
    gate = L.ReLU(6.0)(_conv(x, kernel=1) + 3.0) * (1.0 / 6.0)
    x = L.Multiply()([x, gate])
    x = L.Activation("hard_silu")(x)
    model = keras.Model(inputs, _head(keras.ops.tanh(x)))
    qat = qat_plugin.quantize_model(model)
    names = {type(layer).__name__ for layer in qat.layers}
    wrapped = {type(getattr(layer, "layer", None)).__name__ for layer in qat.layers}
    assert {"QuantizedSwish", "QuantizedAffine"} <= names
    assert "OperationLayer" in wrapped
    x = _pixels(16)
    qat_plugin.calibrate(qat, x)
    assert_keras_round_trip(qat, x, tmp_path / "coverage.keras")


def test_groups_link_through_vanishing_layers_and_stay_apart_across_models(
    tmp_path,
):
    # An identity Normalization vanishes: the conv before it still joins the
    # concatenation's range. Two QAT models of one name in one file keep
    # their own groups when loaded.
    def qat_model():
        inputs = keras.Input(SHAPE)
        a = L.Normalization(mean=0.0, variance=1.0)(_conv(inputs))
        merged = L.Concatenate(name="cat")([a, _conv(inputs)])
        model = keras.Model(inputs, _head(merged), name="net")
        qat = qat_plugin.quantize_model(model)
        qat_plugin.calibrate(qat, _pixels(16, seed=len(qat.layers)) / 127.5 - 1.0)
        return qat

    first, second = qat_model(), qat_model()
    second.name = "net_2"  # Keras wants unique names; the groups were made
    # for two models named "net".
    group = first.get_layer("cat").range_group
    members = [l for l in first.layers if getattr(l, "range_group", None) is group]
    assert len(members) == 3  # Both convs and the concatenation.
    inputs = keras.Input(SHAPE)
    both = keras.Model(inputs, [first(inputs), second(inputs)])
    x = _pixels(16, seed=3) / 127.5 - 1.0
    restored = assert_keras_round_trip(both, x, tmp_path / "both.keras")
    groups = [
        {id(l.range_group) for l in nested.layers if getattr(l, "range_group", None)}
        for nested in restored.layers[1:]
    ]
    assert len(groups[0]) == len(groups[1]) == 1 and groups[0] != groups[1]
