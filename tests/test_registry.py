"""The registry: one self-consistent `LayerSpec` row per exact layer class."""

import dataclasses

import keras
import pytest
from keras.src.applications.convnext import LayerScale
from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

from qat_plugin import registry
from qat_plugin.layers import PrunedLayer
from qat_plugin.linear_ops import ConvOp, DenseOp, DepthwiseConvOp, SeparableConvOp
from qat_plugin.quantize import plan
from qat_plugin.quantize.builders import BUILDERS
from qat_plugin.registry import LayerQuantization, LayerSpec
from qat_plugin.sparsity import ConstantSparsity

L = keras.layers


@pytest.fixture
def rows(monkeypatch):
    """A private copy of the table, so `register_layer` leaves no rows behind."""
    table = dict(registry._ROWS)
    monkeypatch.setattr(registry, "_ROWS", table)
    return table


# -- the table ---------------------------------------------------------------


def _row_problems(cls, spec):
    problems = []
    if not isinstance(cls, type):
        problems.append("key is not a class")
    if spec.policy not in registry.POLICIES:
        problems.append(f"unknown policy {spec.policy!r}")
    if (spec.policy == registry.LINEAR) != (spec.linear_op is not None):
        problems.append("linear_op without LINEAR (or LINEAR without one)")
    if (spec.policy == registry.ACTIVATION) != (spec.activation is not None):
        problems.append("activation without ACTIVATION (or the reverse)")
    if spec.custom is not None:
        problems.append("a built-in row with a LayerQuantization")
    # Scale folds go into kernels, so only Conv/Dense rows fold; averaging
    # and zero padding are properties of same-scale (passthrough) ops.
    if (spec.folds_output_scale or spec.folds_input_scale) and spec.policy != registry.LINEAR:
        problems.append("a scale fold on a row without kernels")
    if (spec.averages is not False or spec.pads_with_zeros) and spec.policy != registry.PASSTHROUGH:
        problems.append("averages/pads_with_zeros on a non-passthrough row")
    if spec.fuses_activation and spec.policy not in (
        registry.LINEAR, registry.BATCH_NORM, registry.OUTPUT, registry.SCALED_ADD
    ):
        problems.append("fuses_activation on a policy TFLite does not fuse into")
    try:  # Re-running the validation on the row's own fields accepts it.
        dataclasses.replace(spec)
    except ValueError as error:
        problems.append(str(error))
    return problems


def test_every_row_is_self_consistent():
    # The built-in rows: other tests register their own layers with
    # register_layer, for the whole session.
    builtin = {cls: spec for cls, spec in registry._ROWS.items()
               if cls.__module__.startswith("keras.")}
    assert len(builtin) > 50
    problems = {
        cls.__name__: found
        for cls, spec in builtin.items()
        if (found := _row_problems(cls, spec))
    }
    assert problems == {}


def test_the_row_check_catches_a_bad_row():
    # The check above must be able to fail: a hand-made bad row is caught.
    bad = object.__new__(LayerSpec)
    for field, value in dict(
        policy=registry.OUTPUT, linear_op=DenseOp(), folds_output_scale=True,
        folds_input_scale=False, averages=True, pads_with_zeros=False,
        fuses_activation=False, activation=None, custom=None,
    ).items():
        object.__setattr__(bad, field, value)
    problems = _row_problems(L.Add, bad)
    assert problems[:3] == [
        "linear_op without LINEAR (or LINEAR without one)",
        "a scale fold on a row without kernels",
        "averages/pads_with_zeros on a non-passthrough row",
    ]
    assert "linear_op goes with policy 'linear'" in problems[3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"policy": "int4"}, "policy must be one of"),
        (
            {"policy": registry.OUTPUT, "linear_op": DenseOp()},
            "linear_op goes with policy 'linear'",
        ),
        ({"policy": registry.LINEAR}, "linear_op goes with policy 'linear'"),
        (
            {"policy": registry.OUTPUT, "activation": "relu"},
            "activation goes with policy 'activation'",
        ),
        ({"policy": registry.ACTIVATION}, "activation goes with policy 'activation'"),
        ({"policy": registry.CUSTOM}, "LayerQuantization goes with policy 'custom'"),
        (
            {"policy": registry.PASSTHROUGH, "custom": LayerQuantization()},
            "LayerQuantization goes with policy 'custom'",
        ),
    ],
)
def test_layer_spec_rejects_inconsistent_rows(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerSpec(**kwargs)


def test_every_policy_has_exactly_one_builder():
    assert set(BUILDERS) == set(registry.POLICIES)
    assert len(registry.POLICIES) == len(set(registry.POLICIES))
    assert set(registry.REGISTRABLE_POLICIES) <= set(registry.POLICIES)


def test_linear_class_names_lists_the_conv_dense_classes():
    assert registry.linear_class_names() == [
        "Conv1D", "Conv1DTranspose", "Conv2D", "Conv2DTranspose", "Conv3D",
        "Dense", "DepthwiseConv1D", "DepthwiseConv2D", "EinsumDense", "SeparableConv1D",
        "SeparableConv2D",
    ]


def test_linear_op_for_conv_and_dense():
    cases = [
        (L.Dense(2), DenseOp),
        (L.Conv1D(2, 3), ConvOp),
        (L.Conv2D(2, 3), ConvOp),
        (L.Conv3D(2, 3), ConvOp),
        (L.DepthwiseConv1D(3), DepthwiseConvOp),
        (L.DepthwiseConv2D(3), DepthwiseConvOp),
        (L.SeparableConv1D(2, 3), SeparableConvOp),
        (L.SeparableConv2D(2, 3), SeparableConvOp),
    ]
    for layer, op in cases:
        assert type(registry.linear_op_for(layer)) is op, type(layer).__name__
        assert registry.policy_for(layer) == registry.LINEAR


def test_scale_folds_only_where_the_kernel_last_axis_is_the_output_channel():
    spec = registry.spec_for
    assert spec(L.Dense(2)).folds_output_scale and spec(L.Conv2D(2, 3)).folds_output_scale
    assert not spec(L.DepthwiseConv2D(3)).folds_output_scale
    assert not spec(L.SeparableConv2D(2, 3)).folds_output_scale
    # An input scale folds into every kernel (it multiplies the input side).
    assert spec(L.DepthwiseConv2D(3)).folds_input_scale
    assert spec(L.SeparableConv2D(2, 3)).folds_input_scale


# -- lookups -----------------------------------------------------------------


def test_policy_for_exact_classes():
    cases = [
        (L.Dense(2), registry.LINEAR),
        (L.BatchNormalization(), registry.BATCH_NORM),
        (L.ReLU(), registry.ACTIVATION),
        (L.Add(), registry.OUTPUT),
        (L.GlobalAveragePooling2D(), registry.OUTPUT),
        (L.Concatenate(), registry.SHARED_SCALE),
        (L.Maximum(), registry.SHARED_SCALE),
        (L.MaxPooling2D(), registry.PASSTHROUGH),
        (L.AveragePooling2D(2), registry.PASSTHROUGH),
        (L.Flatten(), registry.PASSTHROUGH),
        (L.ZeroPadding2D(), registry.PASSTHROUGH),
        (L.Rescaling(0.5), registry.AFFINE),
        (L.Normalization(), registry.AFFINE),
        (L.LayerNormalization(), registry.LAYER_NORM),
        (L.Conv3DTranspose(2, 3), registry.FLOAT),
        (CustomScaleLayer(0.2), registry.SCALED_ADD),
        (LayerScale(0.1, 4), registry.CHANNEL_SCALE),
    ]
    mismatches = [
        (type(layer).__name__, want, registry.policy_for(layer))
        for layer, want in cases
        if registry.policy_for(layer) != want
    ]
    assert mismatches == []


def test_a_subclass_has_no_row():
    class MyDense(L.Dense):
        pass

    class MyReLU(L.ReLU):
        pass

    for layer in (MyDense(2), MyReLU()):
        assert registry.spec_for(layer) is None
        assert registry.policy_for(layer) is None
        assert registry.linear_op_for(layer) is None
        assert registry.activation_name(layer) is None
    # A Lambda has a row (float, unless its function traces into keras.ops);
    # a subclass of it does not.
    assert registry.policy_for(L.Lambda(lambda t: t)) == registry.FLOAT

    class MyLambda(L.Lambda):
        pass

    assert registry.policy_for(MyLambda(lambda t: t)) is None


def test_activation_name():
    cases = [
        (L.ReLU(), "relu"),
        (L.ReLU(max_value=6), "relu6"),
        (L.ReLU(max_value=6.0), "relu6"),
        (L.ReLU(max_value=3), None),
        (L.ReLU(negative_slope=0.1), None),
        (L.ReLU(threshold=0.5), None),
        (L.Softmax(), "softmax"),
        (L.Softmax(axis=1), None),
        (L.Activation("sigmoid"), "sigmoid"),
        (L.Activation("relu6"), "relu6"),
        (L.Activation("tanh"), "tanh"),
        (L.Activation("linear"), "linear"),
        (L.LeakyReLU(), "leaky_relu"),
        (L.Dense(2), None),
        (L.Add(), None),
    ]
    mismatches = [
        (type(layer).__name__, layer.get_config(), want, registry.activation_name(layer))
        for layer, want in cases
        if registry.activation_name(layer) != want
    ]
    assert mismatches == []


def test_function_name():
    assert registry.function_name(None) == "linear"
    assert registry.function_name(keras.activations.relu) == "relu"
    assert registry.function_name(keras.activations.get("linear")) == "linear"
    assert registry.function_name(keras.activations.hard_sigmoid) == "hard_sigmoid"


def test_only_bilinear_upsampling_averages():
    spec = registry.spec_for(L.UpSampling2D())
    assert spec.averages_for(L.UpSampling2D(interpolation="nearest")) is False
    assert spec.averages_for(L.UpSampling2D(interpolation="bilinear")) is True
    assert registry.spec_for(L.AveragePooling2D(2)).averages_for(L.AveragePooling2D(2)) is True
    assert registry.spec_for(L.MaxPooling2D()).averages_for(L.MaxPooling2D()) is False


def test_only_zero_padding_pads_with_zeros():
    assert registry.spec_for(L.ZeroPadding2D()).pads_with_zeros
    assert not registry.spec_for(L.Cropping2D()).pads_with_zeros
    assert not registry.spec_for(L.MaxPooling2D()).pads_with_zeros


# -- register_layer ----------------------------------------------------------


class _Swap(keras.layers.Layer):
    def call(self, x):
        return x[:, ::-1]


class _Scale(keras.layers.Layer):
    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1],))

    def call(self, x):
        return x * self.kernel


def test_register_layer_by_policy_name(rows):
    assert registry.policy_for(_Swap()) is None
    registry.register_layer(_Swap, "passthrough")
    assert rows[_Swap] == LayerSpec(registry.PASSTHROUGH)
    assert registry.policy_for(_Swap()) == registry.PASSTHROUGH
    registry.register_layer(_Swap, "float")  # A second call replaces the row.
    assert registry.policy_for(_Swap()) == registry.FLOAT

    class SubSwap(_Swap):
        pass

    assert registry.policy_for(SubSwap()) is None  # Exact classes only.


def test_a_passthrough_layer_quantization_becomes_passthrough(rows):
    registry.register_layer(_Swap, LayerQuantization(passthrough=True))
    spec = registry.spec_for(_Swap())
    assert spec.policy == registry.PASSTHROUGH and spec.custom is None


def test_a_weighted_layer_quantization_becomes_custom(rows):
    declared = LayerQuantization(weights={"kernel": None})
    registry.register_layer(_Scale, declared)
    spec = registry.spec_for(_Scale())
    assert spec.policy == registry.CUSTOM
    assert spec.custom is declared
    assert spec.linear_op is None and not spec.fuses_activation


def test_register_layer_rejects_a_non_class(rows):
    before = dict(rows)
    with pytest.raises(TypeError, match="expects a Keras layer class"):
        registry.register_layer(_Swap(), "passthrough")
    with pytest.raises(TypeError, match="expects a Keras layer class"):
        registry.register_layer(int, "passthrough")
    assert rows == before


@pytest.mark.parametrize("policy", ["linear", "activation", "custom", "bogus", None])
def test_register_layer_rejects_an_unregistrable_policy(rows, policy):
    with pytest.raises(ValueError, match=r"register_layer\(_Swap\): policy must be one of"):
        registry.register_layer(_Swap, policy)
    assert _Swap not in rows


def test_layer_quantization_validates_its_fields():
    with pytest.raises(TypeError, match="weights must map"):
        LayerQuantization(weights={"kernel": "last"})
    with pytest.raises(ValueError, match="passthrough layer keeps its input's scale"):
        LayerQuantization(weights={"kernel": -1}, passthrough=True)
    with pytest.raises(ValueError, match="must contain 0"):
        LayerQuantization(fixed_output_range=(0.5, 1.0))
    assert not LayerQuantization(passthrough=True).has_output_quantizer
    assert LayerQuantization(quantize_output=False, fixed_output_range=(0, 1)).has_output_quantizer


# -- wrappers ----------------------------------------------------------------


def test_a_pruned_layer_quantizes_as_the_layer_it_wraps_without_scale_folds():
    pruned = PrunedLayer(L.Conv2D(4, 3), ConstantSparsity(0.5))
    spec = registry.spec_for(pruned)
    assert spec.policy == registry.LINEAR == registry.policy_for(pruned)
    assert isinstance(spec.linear_op, ConvOp)
    assert spec.fuses_activation
    # Its kernels are masked variables: no constant folds into them.
    assert not spec.folds_output_scale and not spec.folds_input_scale
    # The plain Conv2D row itself is unchanged.
    assert registry.spec_for(L.Conv2D(4, 3)).folds_output_scale
    # `linear_op_for` matches the exact class: a PrunedLayer is not itself a
    # prunable Conv/Dense, so it cannot be wrapped again.
    assert registry.linear_op_for(pruned) is None
    with pytest.raises(ValueError, match="has no kernel to prune"):
        PrunedLayer(pruned, ConstantSparsity(0.5))


def test_a_pruned_dense_gets_the_dense_row():
    pruned = PrunedLayer(L.Dense(4), ConstantSparsity(0.5))
    assert isinstance(registry.spec_for(pruned).linear_op, DenseOp)


def test_a_registered_subclass_of_an_averaging_or_padding_layer_keeps_it(rows):
    class MyPool(L.AveragePooling2D):
        pass

    class MyPad(L.ZeroPadding2D):
        pass

    registry.register_layer(MyPool, "passthrough")
    registry.register_layer(MyPad, registry.LayerQuantization(passthrough=True))
    pool = MyPool((2, 2))
    assert registry.spec_for(pool).averages_for(pool) is True
    assert registry.spec_for(MyPad()).pads_with_zeros is True
    assert plan.average_divisor(pool, 8) == 4
