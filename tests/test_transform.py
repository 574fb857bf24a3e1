"""quantize_model: the graph it builds, what it leaves alone, its errors."""

import keras
import numpy as np
import pytest

import qat_plugin
from qat_plugin import layers as qlayers

L = keras.layers


def conv_bn_relu_model():
    return keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            L.Conv2D(4, 3, use_bias=False, name="conv"),
            L.BatchNormalization(name="bn"),
            L.ReLU(name="relu"),
            L.Conv2D(4, 3, activation="relu6", name="conv_relu6"),
            L.Flatten(name="flatten"),
            L.Dense(3, activation="softmax", name="head"),
        ],
        name="cnn",
    )


def test_fuses_conv_bn_relu_and_splits_softmax():
    qat = qat_plugin.quantize_model(conv_bn_relu_model())
    by_name = {layer.name: layer for layer in qat.layers}
    assert "bn" not in by_name and "relu" not in by_name
    conv = by_name["conv"]
    assert isinstance(conv, qlayers.QuantizedLinear)
    assert conv.batch_norm is not None and conv.activation == "relu"
    assert by_name["conv_relu6"].activation == "relu6"
    assert type(by_name["flatten"]) is L.Flatten  # keeps its input's scale
    assert by_name["head"].activation == "linear"
    softmax = by_name["head_activation"]
    assert isinstance(softmax, qlayers.QuantizeOutputWrapper)
    assert softmax.fixed_range == (0.0, 255 / 256)
    assert isinstance(by_name["input_layer_quantize"] if "input_layer_quantize" in by_name else qat.layers[1], qlayers.FakeQuant)


def test_original_model_and_weights_are_untouched():
    model = conv_bn_relu_model()
    before = [w.copy() for w in model.get_weights()]
    qat = qat_plugin.quantize_model(model)
    qat.compile("adam", "sparse_categorical_crossentropy")
    x = np.random.rand(16, 8, 8, 2).astype("float32")
    qat.fit(x, np.zeros(16), epochs=1, verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert model.layers[1].name == "bn"


def test_weights_are_copied_into_the_quantized_layers():
    model = conv_bn_relu_model()
    qat = qat_plugin.quantize_model(model)
    conv = {layer.name: layer for layer in qat.layers}["conv"]
    np.testing.assert_array_equal(conv.layer.kernel.numpy(), model.get_layer("conv").kernel.numpy())
    np.testing.assert_array_equal(
        conv.batch_norm.moving_variance.numpy(), model.get_layer("bn").moving_variance.numpy()
    )


def test_concatenate_inputs_share_its_range():
    inputs = keras.Input((6, 6, 3))
    a = L.Conv2D(2, 1, name="a")(inputs)
    b = L.Conv2D(2, 1, name="b")(inputs)
    c = L.Conv2D(2, 1, name="c")(inputs)
    merged = L.Concatenate(name="cat")([a, b])
    out = L.Add(name="add")([L.Conv2D(4, 1, name="d")(merged), L.Concatenate(name="cat2")([c, c])])
    qat = qat_plugin.quantize_model(keras.Model(inputs, out))
    layer = {layer.name: layer for layer in qat.layers}
    group = layer["cat"].range_group
    assert group is layer["a"].range_group is layer["b"].range_group
    assert layer["c"].range_group is layer["cat2"].range_group is not group
    assert layer["d"].range_group is None and layer["add"].range_group is None
    x = np.random.default_rng(0).normal(size=(8, 6, 6, 3)).astype("float32")
    qat_plugin.calibrate(qat, x)
    own = {
        name: (float(layer[name].output_quantizer.range_min),
               float(layer[name].output_quantizer.range_max))
        for name in ("a", "b", "cat")
    }
    union = (min(r[0] for r in own.values()), max(r[1] for r in own.values()))
    assert own["a"] != own["b"]  # Each member observes its own tensor.
    for name in ("a", "b", "cat"):
        quantized = layer[name].output_quantizer.current_range()
        np.testing.assert_allclose([float(v) for v in quantized], union, rtol=1e-6)


def test_shared_layer_stays_shared_and_is_not_fused():
    inputs = keras.Input((4,))
    dense = L.Dense(4, name="shared")
    bn = L.BatchNormalization(name="bn")
    out = L.Add()([bn(dense(inputs)), dense(inputs)])
    qat = qat_plugin.quantize_model(keras.Model(inputs, out))
    shared = [layer for layer in qat.layers if layer.name == "shared"]
    assert len(shared) == 1 and shared[0].batch_norm is None
    assert len(shared[0]._inbound_nodes) == 2
    assert isinstance(qat.get_layer("bn"), qlayers.QuantizedBatchNormalization)


def test_nested_models_are_inlined_with_unique_names():
    inner = keras.Sequential(
        [keras.Input((4,)), L.Dense(4, name="dense"), L.ReLU(name="relu")], name="block"
    )
    inputs = keras.Input((4,))
    x = L.Dense(4, name="dense")(inputs) if False else inputs
    out = L.Dense(2, name="head")(inner(inner(x)))
    model = keras.Model(inputs, out)
    qat = qat_plugin.quantize_model(model)
    names = [layer.name for layer in qat.layers]
    assert names.count("dense") == 1  # the nested layer is shared across both calls
    assert qat.get_layer("dense").activation == "relu"
    x = np.random.rand(5, 4).astype("float32")
    assert qat(x).shape == (5, 2)


def test_multi_input_multi_output_structure_is_kept():
    a = keras.Input((4,), name="a")
    b = keras.Input((4,), name="b")
    merged = L.Concatenate()([L.Dense(3)(a), L.Dense(3)(b)])
    model = keras.Model({"a": a, "b": b}, {"x": L.Dense(2)(merged), "y": L.Dense(1)(merged)})
    qat = qat_plugin.quantize_model(model)
    out = qat({"a": np.ones((2, 4), "float32"), "b": np.ones((2, 4), "float32")})
    assert set(out) == {"x", "y"}


def test_skip_keeps_layers_float():
    model = conv_bn_relu_model()
    qat = qat_plugin.quantize_model(model, skip=["conv_relu6"])
    layer = qat.get_layer("conv_relu6")
    assert type(layer) is L.Conv2D
    assert isinstance(qat.get_layer("conv_relu6_quantize"), qlayers.FakeQuant)


def test_skip_takes_one_name_as_a_name():
    qat = qat_plugin.quantize_model(conv_bn_relu_model(), skip="conv_relu6")
    assert type(qat.get_layer("conv_relu6")) is L.Conv2D


def test_a_quantized_model_is_refused_saying_by_whom():
    qat = qat_plugin.quantize_model(conv_bn_relu_model())
    with pytest.raises(qat_plugin.UnsupportedModelError, match="already a QAT model"):
        qat_plugin.quantize_model(qat)
    by_keras = keras.Sequential([keras.Input((4,)), L.Dense(3, name="dense")], name="k")
    by_keras.quantize("int8")
    with pytest.raises(qat_plugin.UnsupportedModelError,
                       match=r"quantized by Keras \(model.quantize\('int8'\): layers \['dense'\]"):
        qat_plugin.quantize_model(by_keras)


def test_skip_with_unknown_name_fails():
    with pytest.raises(ValueError, match="skip names layers that are not in model 'cnn': \\['nope'\\]"):
        qat_plugin.quantize_model(conv_bn_relu_model(), skip=["nope"])


def test_subclassed_model_is_rejected():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(2)

        def call(self, x):
            return self.dense(x)

    with pytest.raises(qat_plugin.UnsupportedModelError, match="subclassed keras.Model"):
        qat_plugin.quantize_model(Net())


def test_unbuilt_sequential_is_rejected():
    with pytest.raises(qat_plugin.UnsupportedModelError, match="keras.Input"):
        qat_plugin.quantize_model(keras.Sequential([L.Dense(2)]))


def test_non_keras3_model_is_rejected():
    class FakeKeras2Model:
        pass

    FakeKeras2Model.__module__ = "tf_keras.src.engine.sequential"
    with pytest.raises(qat_plugin.UnsupportedModelError, match="Keras 2 \\(tf_keras\\)"):
        qat_plugin.quantize_model(FakeKeras2Model())


def test_unknown_recipe_suggests_the_closest_name():
    with pytest.raises(ValueError, match="Did you mean 'int8'"):
        qat_plugin.quantize_model(conv_bn_relu_model(), recipe="int9")


def _mixed_cnn():
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(x))


@pytest.mark.tf_only
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_and_exports_fully_int8(policy):
    from tests.conftest import assert_parity, images

    x, y = images(64, (8, 8, 1))
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        built_under_policy = _mixed_cnn()
        # QAT under the policy: the quantizers used to fail with a dtype error.
        qat = qat_plugin.quantize_model(built_under_policy)
        assert keras.config.dtype_policy().name == policy  # restored
        qat.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        qat.fit(x, y, epochs=1, verbose=0)
    finally:
        keras.config.set_dtype_policy(previous)
    assert {layer.dtype_policy.name for layer in qat.layers} == {"float32"}
    # ... and a model built under it, quantized after resetting the policy.
    for model in (qat, qat_plugin.quantize_model(built_under_policy)):
        if model is not qat:
            qat_plugin.calibrate(model, x)
        data = qat_plugin.export_tflite(model)
        report = qat_plugin.inspect_tflite(data)
        assert report.is_fully_int8 and not report.float_ops
        assert [op.name for op in report.ops] == ["CONV_2D", "MEAN", "FULLY_CONNECTED"]
        assert_parity(model, data, x)


def test_a_zero_size_input_is_refused_naming_it():
    model = keras.Sequential([keras.Input((0,), name="empty"), keras.layers.Dense(2)])
    with pytest.raises(qat_plugin.UnsupportedModelError,
                       match=r"input 'empty' has shape \(None, 0\), with a dimension of size 0"):
        qat_plugin.quantize_model(model)
