"""The planning passes: what folds, what vanishes, which tensors share a range."""

import dataclasses
import math

import keras
import numpy as np
import pytest
from keras.src.applications.convnext import LayerScale
from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

from qat_plugin.layers import PrunedLayer
from qat_plugin.quantize import plan as planning
from qat_plugin.quantize.graph import LayerGraph
from qat_plugin.range_groups import RangeGroup
from qat_plugin.sparsity import ConstantSparsity

L = keras.layers


def plan_of(model, skip=()):
    graph = LayerGraph.from_model(model)
    return planning.make_plan(graph, skip), {n.name: n for n in graph.nodes}


def chain(*layers, shape=(8, 8, 3), dtype="float32"):
    inputs = keras.Input(shape, dtype=dtype)
    x = inputs
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x, name="chain")


# -- plan_scale_folds --------------------------------------------------------


def test_a_layer_scale_folds_into_the_dense_before_it():
    plan, node = plan_of(chain(L.Dense(4, name="pw"), LayerScale(0.5, 4, name="ls"),
                               shape=(5, 3)))
    assert set(plan.scale_folds) == {id(node["pw"])}
    np.testing.assert_array_equal(plan.scale_folds[id(node["pw"])], np.full(4, 0.5))
    assert plan.folded_scales == {id(node["ls"])}
    assert id(node["ls"]) in plan.aliases  # It vanishes.


def _residual(head, scale=0.17):
    inputs = keras.Input((6, 6, 4))
    shortcut = L.Conv2D(4, 1, name="shortcut")(inputs)
    out = CustomScaleLayer(scale, name="scaled_add")([shortcut, head(inputs)])
    return keras.Model(inputs, out)


def test_an_inception_resnet_scale_folds_into_the_residual_conv():
    plan, node = plan_of(_residual(L.Conv2D(4, 1, name="residual")))
    assert plan.scale_folds == {id(node["residual"]): 0.17}
    assert isinstance(plan.scale_folds[id(node["residual"])], float)
    assert plan.folded_scales == {id(node["scaled_add"])}
    # The addition itself stays: only the scale folds.
    assert id(node["scaled_add"]) not in plan.aliases


def test_a_scale_does_not_fold_into_the_shortcut_branch():
    inputs = keras.Input((6, 6, 4))
    residual = L.Conv2D(4, 1, name="residual")(inputs)
    residual = L.BatchNormalization(name="bn")(residual)
    shortcut = L.Conv2D(4, 1, name="shortcut")(inputs)
    out = CustomScaleLayer(0.2, name="scaled_add")([shortcut, residual])
    plan, _ = plan_of(keras.Model(inputs, out))
    assert plan.scale_folds == {} and plan.folded_scales == frozenset()


@pytest.mark.parametrize(
    "before",
    [
        lambda: [L.Conv2D(4, 1, name="p"), L.BatchNormalization(name="bn")],
        lambda: [L.Conv2D(4, 1, name="p"), L.ReLU(name="relu")],
        lambda: [L.Conv2D(4, 1, activation="relu", name="p")],
        lambda: [L.DepthwiseConv2D(1, name="p")],
        lambda: [L.Conv2D(4, 1, data_format="channels_first", name="p")],
        lambda: [PrunedLayer(L.Conv2D(4, 1, name="p"), ConstantSparsity(0.5))],
        lambda: [L.MaxPooling2D(1, name="p")],
    ],
    ids=["after_bn_fusion", "after_relu_fusion", "own_activation", "depthwise",
         "channels_first", "pruned", "not_linear"],
)
def test_a_layer_scale_folds_only_into_a_plain_conv_or_dense(before):
    plan, node = plan_of(chain(*before(), LayerScale(0.5, 4, name="ls"), shape=(4, 6, 4)))
    assert plan.scale_folds == {}
    assert id(node["ls"]) not in plan.aliases


def test_a_scale_does_not_fold_into_a_shared_conv():
    inputs = keras.Input((6, 6, 4))
    conv = L.Conv2D(4, 1, name="conv")
    out = L.Add()([LayerScale(0.5, 4, name="ls")(conv(inputs)), conv(inputs)])
    plan, _ = plan_of(keras.Model(inputs, out))
    assert plan.scale_folds == {}


def test_a_scale_does_not_fold_into_a_conv_read_elsewhere_too():
    inputs = keras.Input((6, 6, 4))
    conv = L.Conv2D(4, 1, name="conv")(inputs)
    out = L.Add()([LayerScale(0.5, 4, name="ls")(conv), conv])
    plan, _ = plan_of(keras.Model(inputs, out))
    assert plan.scale_folds == {}


def test_a_scaled_add_of_one_tensor_twice_does_not_fold():
    inputs = keras.Input((6, 6, 4))
    conv = L.Conv2D(4, 1, name="conv")(inputs)
    plan, _ = plan_of(keras.Model(inputs, CustomScaleLayer(0.5)([conv, conv])))
    assert plan.scale_folds == {}


@pytest.mark.parametrize("skipped", ["residual", "scaled_add"])
def test_a_skipped_layer_folds_no_scale(skipped):
    plan, _ = plan_of(_residual(L.Conv2D(4, 1, name="residual")), skip=[skipped])
    assert plan.scale_folds == {} and plan.folded_scales == frozenset()


# -- plan_bias_folds ---------------------------------------------------------


def _plus(constant, conv=None, left=False):
    inputs = keras.Input((6, 6, 3))
    x = (conv or L.Conv2D(4, 1, name="conv"))(inputs)
    return keras.Model(inputs, keras.ops.relu(constant + x if left else x + constant))


@pytest.mark.parametrize("constant, left", [(3.0, False), (3.0, True), (3, False)])
def test_a_constant_added_after_a_conv_folds_into_its_bias(constant, left):
    plan, node = plan_of(_plus(constant, left=left))
    add = next(n for n in plan.graph.nodes if n.name.startswith("add"))
    assert plan.bias_folds == {id(node["conv"]): (3.0, add)}
    assert isinstance(plan.bias_folds[id(node["conv"])][0], float)
    assert plan.folded_additions == {id(add)}
    # The ReLU after the addition fuses into the addition's chain.
    assert plan.fusions[id(add)].activation_name == "relu"


@pytest.mark.parametrize(
    "conv",
    [lambda: L.Conv2D(4, 1, use_bias=False, name="conv"),
     lambda: L.Conv2D(4, 1, activation="relu", name="conv"),
     lambda: L.DepthwiseConv2D(1, name="conv")],
    ids=["no_bias", "own_activation", "depthwise"],
)
def test_a_constant_does_not_fold_into_a_conv_it_cannot_shift(conv):
    plan, _ = plan_of(_plus(3.0, conv=conv()))
    assert plan.bias_folds == {} and plan.folded_additions == frozenset()


def test_an_addition_of_two_tensors_or_after_a_bn_does_not_fold():
    inputs = keras.Input((6, 6, 3))
    conv = L.Conv2D(4, 1, name="conv")(inputs)
    plan, _ = plan_of(keras.Model(inputs, conv + conv))
    assert plan.bias_folds == {}
    bn = L.BatchNormalization(name="bn")(L.Conv2D(4, 1, name="conv2")(inputs))
    plan, _ = plan_of(keras.Model(inputs, bn + 3.0))
    assert plan.bias_folds == {}


def test_a_skipped_addition_does_not_fold():
    plan, _ = plan_of(_plus(3.0))
    add = next(n for n in plan.graph.nodes if n.name.startswith("add"))
    plan = planning.make_plan(plan.graph, {add.name})
    assert plan.bias_folds == {}


# -- plan_input_scale_folds --------------------------------------------------


def test_a_scalar_rescaling_folds_into_the_conv_after_it():
    plan, node = plan_of(chain(L.Rescaling(1 / 255, name="rescale"), L.Conv2D(4, 3, name="conv")))
    assert plan.input_scale_folds == {id(node["conv"]): (1 / 255, node["rescale"])}
    assert plan.aliases == {id(node["rescale"])}


@pytest.mark.parametrize(
    "between",
    [lambda: [L.ZeroPadding2D(1)], lambda: [L.ZeroPadding2D(1), L.ZeroPadding2D(2)],
     lambda: [L.Normalization(mean=0.0, variance=1.0, name="identity")]],
    ids=["padding", "two_paddings", "identity_normalization"],
)
def test_a_rescaling_folds_through_zero_padding_and_identities(between):
    plan, node = plan_of(chain(L.Rescaling(0.5, name="rescale"), *between(),
                               L.Conv2D(4, 3, name="conv")))
    assert plan.input_scale_folds == {id(node["conv"]): (0.5, node["rescale"])}


def test_a_rescaling_folds_into_a_depthwise_conv_and_a_dense():
    plan, node = plan_of(chain(L.Rescaling(2.0, name="r"), L.DepthwiseConv2D(3, name="dw")))
    assert set(plan.input_scale_folds) == {id(node["dw"])}
    plan, node = plan_of(chain(L.Rescaling([2.0], name="r"), L.Dense(3, name="d"), shape=(4,)))
    assert plan.input_scale_folds == {id(node["d"]): (2.0, node["r"])}


@pytest.mark.parametrize(
    "rescaling, after, dtype",
    [
        (lambda: L.Rescaling(1 / 127.5, offset=-1.0), lambda: [], "float32"),
        (lambda: L.Rescaling([0.5, 1.0, 2.0]), lambda: [], "float32"),
        (lambda: L.Rescaling(1 / 255), lambda: [], "uint8"),
        (lambda: L.Rescaling(0.5), lambda: [L.MaxPooling2D()], "float32"),
        (lambda: L.Rescaling(0.5), lambda: [L.Normalization(mean=1.0, variance=1.0)], "float32"),
        (lambda: L.Rescaling(0.5),
         lambda: [PrunedLayer(L.Conv2D(4, 3), ConstantSparsity(0.5))], "float32"),
    ],
    ids=["offset", "per_channel_scale", "integer_input", "through_max_pool",
         "through_real_normalization", "into_pruned_conv"],
)
def test_a_rescaling_that_cannot_fold(rescaling, after, dtype):
    layer = rescaling()
    plan, node = plan_of(chain(layer, *after(), L.Conv2D(4, 3, name="conv"), dtype=dtype))
    assert plan.input_scale_folds == {}
    assert id(node[layer.name]) not in plan.aliases


def test_a_rescaling_read_twice_or_before_a_skipped_conv_does_not_fold():
    inputs = keras.Input((8, 8, 3))
    scaled = L.Rescaling(0.5, name="r")(inputs)
    out = L.Add()([L.Conv2D(4, 3, name="a")(scaled), L.Conv2D(4, 3, name="b")(scaled)])
    plan, _ = plan_of(keras.Model(inputs, out))
    assert plan.input_scale_folds == {}
    plan, _ = plan_of(chain(L.Rescaling(0.5, name="r"), L.Conv2D(4, 3, name="conv")),
                      skip=["conv"])
    assert plan.input_scale_folds == {}


# -- plan_aliases and is_identity_affine -------------------------------------


def test_aliases_are_the_folded_rescaling_and_the_identity_normalization():
    plan, node = plan_of(chain(
        L.Normalization(mean=0.0, variance=1.0, name="identity_norm"),
        L.Rescaling(1 / 255, name="rescale"),
        L.Conv2D(4, 3, name="conv"),
        L.Normalization(mean=0.5, variance=2.0, name="real_norm"),
        L.Rescaling(1.0, name="identity_rescale"),
    ))
    assert plan.aliases == {
        id(node["identity_norm"]), id(node["rescale"]), id(node["identity_rescale"])
    }
    assert isinstance(plan.aliases, frozenset)


def test_is_identity_affine():
    graph = LayerGraph.from_model(chain(
        L.Rescaling(1.0, name="r1"),
        L.Rescaling(1.0, offset=0.5, name="r_offset"),
        L.Rescaling(2.0, name="r2"),
        L.Normalization(mean=0.0, variance=1.0, name="n01"),
        L.Normalization(mean=0.0, variance=1.0, invert=True, name="n_invert"),
        L.Normalization(mean=0.0, variance=4.0, name="n_var"),
        L.Dense(3, name="dense"),
    ))
    identities = {n.name for n in graph.nodes if planning.is_identity_affine(n)}
    assert identities == {"r1", "n01"}
    # A Rescaling of an integer input also casts it: it cannot vanish.
    graph = LayerGraph.from_model(chain(L.Rescaling(1.0, name="cast"), dtype="uint8"))
    assert not planning.is_identity_affine(graph.nodes[0])


def test_a_skipped_identity_is_no_alias():
    plan, node = plan_of(chain(L.Normalization(mean=0.0, variance=1.0, name="n"),
                               L.Conv2D(2, 1)), skip=["n"])
    assert plan.aliases == frozenset()


# -- plan_range_groups -------------------------------------------------------


def test_every_tensor_around_a_concatenate_shares_one_group():
    inputs = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 1, name="a")(inputs)
    pooled = L.MaxPooling2D(name="pool")(a)
    b = L.Conv2D(4, 2, strides=2, name="b")(inputs)
    cat = L.Concatenate(name="cat")([pooled, b])
    out = L.Conv2D(2, 1, name="after")(cat)
    plan, node = plan_of(keras.Model(inputs, out, name="m"))
    keys = [node["a"].outputs[0], node["pool"].outputs[0], node["b"].outputs[0],
            node["cat"].outputs[0]]
    group = plan.range_groups[keys[0]]
    assert isinstance(group, RangeGroup)
    assert all(plan.range_groups[key] is group for key in keys)
    assert set(plan.range_groups) == set(keys)  # Not the input, not "after".
    assert group.name.startswith("m/cat/")


def test_two_concatenates_get_two_groups_and_a_fused_tail_is_the_member():
    inputs = keras.Input((8, 8, 3))
    relu = L.ReLU(name="relu")(L.BatchNormalization(name="bn")(L.Conv2D(4, 1, name="a")(inputs)))
    cat1 = L.Concatenate(name="cat1")([relu, inputs])
    c = L.Conv2D(4, 1, name="c")(cat1)
    cat2 = L.Concatenate(name="cat2")([c, c])
    plan, node = plan_of(keras.Model(inputs, cat2))
    g1 = plan.range_groups[node["cat1"].outputs[0]]
    g2 = plan.range_groups[node["cat2"].outputs[0]]
    assert g1 is not g2
    assert plan.range_groups[plan.graph.inputs[0].key] is g1
    assert plan.range_groups[node["relu"].outputs[0]] is g1
    # The conv and BN outputs inside the fused chain are no tensors of the
    # int8 model: only the chain's tail is a member.
    assert node["a"].outputs[0] not in plan.range_groups
    assert node["bn"].outputs[0] not in plan.range_groups
    assert plan.range_groups[node["c"].outputs[0]] is g2


def test_an_average_pooling_output_is_grouped_with_its_input():
    plan, node = plan_of(chain(L.Conv2D(4, 1, name="conv"), L.AveragePooling2D(2, name="avg"),
                               L.Flatten(name="flat"), L.Dense(2, name="dense")))
    group = plan.range_groups[node["avg"].outputs[0]]
    assert plan.range_groups[node["conv"].outputs[0]] is group
    assert plan.range_groups[node["flat"].outputs[0]] is group  # Passthrough after.
    assert node["dense"].outputs[0] not in plan.range_groups
    assert "/avg/" in group.name


def test_passthrough_ops_alone_make_no_group():
    plan, _ = plan_of(chain(L.Conv2D(4, 1), L.MaxPooling2D(), L.Flatten(), L.Dense(2)))
    assert plan.range_groups == {}


def test_nearest_upsampling_makes_no_group_and_bilinear_does():
    plan, _ = plan_of(chain(L.Conv2D(4, 1), L.UpSampling2D(interpolation="nearest")))
    assert plan.range_groups == {}
    plan, node = plan_of(chain(L.Conv2D(4, 1, name="c"),
                               L.UpSampling2D(interpolation="bilinear", name="up")))
    assert plan.range_groups[node["c"].outputs[0]] is plan.range_groups[node["up"].outputs[0]]


def test_every_call_of_a_shared_layer_joins_the_group_of_one():
    a = keras.Input((4,))
    b = keras.Input((4,))
    dense = L.Dense(4, name="shared")
    out = L.Concatenate(name="cat")([dense(a), b])
    other = L.Dense(4, name="other")(dense(b))
    graph = LayerGraph.from_model(keras.Model([a, b], [out, other]))
    plan = planning.make_plan(graph)
    first, second = graph.calls[id(dense)]
    group = plan.range_groups[first.outputs[0]]
    assert plan.range_groups[second.outputs[0]] is group


def test_a_skipped_concatenate_makes_no_group():
    inputs = keras.Input((4,))
    out = L.Concatenate(name="cat")([L.Dense(2)(inputs), L.Dense(2)(inputs)])
    plan, _ = plan_of(keras.Model(inputs, out), skip=["cat"])
    assert plan.range_groups == {}


def test_groups_are_unique_per_plan():
    model = chain(L.Conv2D(4, 1), L.AveragePooling2D(2))
    graph = LayerGraph.from_model(model)
    one = set(map(id, planning.make_plan(graph).range_groups.values()))
    names = {g.name for g in planning.make_plan(graph).range_groups.values()}
    assert len(one) == 1 and len(names) == 1
    assert names != {g.name for g in planning.make_plan(graph).range_groups.values()}


# -- averages and average_divisor --------------------------------------------


def test_average_divisor():
    divisor = planning.average_divisor
    assert divisor(L.AveragePooling2D((2, 2), padding="valid"), 8) == 4
    assert divisor(L.AveragePooling2D((3, 2), padding="valid"), 8) == 6
    # "same": any count 1..p per axis at the borders: lcm(1..p) per axis.
    assert divisor(L.AveragePooling2D((2, 2), padding="same"), 8) == 4
    assert divisor(L.AveragePooling2D((3, 3), padding="same"), 8) == 36
    assert divisor(L.AveragePooling2D((5, 5), padding="same"), 8) == 3600
    assert divisor(L.AveragePooling1D(4, padding="same"), 8) == math.lcm(1, 2, 3, 4)
    # Past 2^(23 - num_bits) the interior count is used.
    assert divisor(L.AveragePooling2D((7, 7), padding="same"), 8) == 49  # 420^2 too big
    assert divisor(L.AveragePooling2D((5, 5), padding="same"), 16) == 25
    assert divisor(L.AveragePooling2D((3, 3), padding="same"), 16) == 36  # 36 <= 128
    # Ops that do not average, or have no pool size.
    assert divisor(L.MaxPooling2D(2), 8) is None
    assert divisor(L.UpSampling2D(interpolation="bilinear"), 8) is None
    assert divisor(L.GlobalAveragePooling2D(), 8) is None


def test_averages():
    assert planning.averages(L.AveragePooling2D(2))
    assert planning.averages(L.UpSampling2D(interpolation="bilinear"))
    assert not planning.averages(L.UpSampling2D())
    assert not planning.averages(L.MaxPooling2D())
    assert not planning.averages(L.Dense(2))

    class MyPool(L.AveragePooling2D):
        pass

    assert not planning.averages(MyPool(2))  # No row: nothing is assumed.


# -- make_plan ---------------------------------------------------------------


def test_make_plan_returns_a_frozen_plan():
    plan, node = plan_of(chain(L.Conv2D(4, 3, name="conv"), L.BatchNormalization(name="bn"),
                               L.ReLU(name="relu"), L.LayerNormalization(name="ln")),
                         skip=["conv", "ln"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.scale_folds = {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.skip = frozenset()
    assert plan.skip == frozenset({"conv", "ln"})
    for field in ("skip", "folded_scales", "folded_additions", "aliases"):
        assert isinstance(getattr(plan, field), frozenset), field
    assert plan.is_float(node["conv"]) and plan.is_float(node["ln"])  # skip
    assert not plan.is_float(node["bn"])
    # The conv is skipped: the BN heads the chain and quantizes the ReLU output.
    assert plan.quantized_key(node["bn"]) == node["relu"].outputs[0]
    assert plan.quantized_key(node["ln"]) == node["ln"].outputs[0]
