"""find_fusions: the Conv/Dense -> BatchNorm -> ReLU chains that become one op."""

import keras
import numpy as np
import pytest

import qat_plugin
from qat_plugin.quantize.fusion import Fusion, find_fusions
from qat_plugin.quantize.graph import LayerGraph

L = keras.layers


def fusions_of(model, skip=()):
    graph = LayerGraph.from_model(model)
    return graph, find_fusions(graph, set(skip)), {n.name: n for n in graph.nodes}


def chain(*layers, shape=(8, 8, 3)):
    inputs = keras.Input(shape)
    x = inputs
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x)


def test_conv_bn_relu_fuses_into_one_fusion():
    model = chain(L.Conv2D(4, 3, name="conv"), L.BatchNormalization(name="bn"),
                  L.ReLU(name="relu"), L.Flatten(name="flat"))
    graph, fusions, node = fusions_of(model)
    fusion = fusions[id(node["conv"])]
    assert isinstance(fusion, Fusion)
    assert fusion.head is node["conv"]
    assert fusion.batch_norm is node["bn"]
    assert fusion.activation is node["relu"]
    assert fusion.activation_name == "relu"
    assert fusion.tail is node["relu"]
    assert fusion.absorbed == [node["bn"], node["relu"]]
    # Every member maps to the one Fusion; nothing else is fused.
    assert fusions[id(node["bn"])] is fusion and fusions[id(node["relu"])] is fusion
    assert id(node["flat"]) not in fusions
    assert len({id(f) for f in fusions.values()}) == 1


def test_relu6_fuses_as_relu6_and_a_clipped_relu_does_not():
    _, fusions, node = fusions_of(chain(L.Dense(4, name="d"), L.ReLU(max_value=6, name="r6"),
                                        shape=(3,)))
    assert fusions[id(node["d"])].activation_name == "relu6"
    assert fusions[id(node["d"])].activation is node["r6"]
    _, fusions, node = fusions_of(chain(L.Dense(4, name="d"), L.ReLU(max_value=3, name="r3"),
                                        shape=(3,)))
    assert fusions[id(node["d"])].activation is None
    assert fusions[id(node["d"])].activation_name == "linear"
    assert id(node["r3"]) not in fusions


@pytest.mark.parametrize(
    "make",
    [lambda: L.Activation("sigmoid"), lambda: L.LeakyReLU(), lambda: L.Softmax(),
     lambda: L.ReLU(negative_slope=0.1)],
    ids=["sigmoid", "leaky_relu", "softmax", "leaky_relu_layer"],
)
def test_other_activations_do_not_fuse(make):
    act = make()
    _, fusions, node = fusions_of(
        chain(L.Conv2D(4, 3, name="conv"), L.BatchNormalization(name="bn"), act)
    )
    fusion = fusions[id(node["conv"])]
    assert fusion.batch_norm is node["bn"]  # The BN still folds.
    assert fusion.activation is None and fusion.activation_name == "linear"
    assert id(node[act.name]) not in fusions


def test_activation_layer_relu_fuses():
    _, fusions, node = fusions_of(
        chain(L.Conv2D(4, 3, name="conv"), L.Activation("relu", name="act"))
    )
    assert fusions[id(node["conv"])].activation is node["act"]
    assert fusions[id(node["conv"])].activation_name == "relu"


def test_a_bn_whose_input_is_read_twice_does_not_fold():
    inputs = keras.Input((8, 8, 3))
    conv = L.Conv2D(4, 3, name="conv")(inputs)
    bn = L.BatchNormalization(name="bn")(conv)
    out = L.Add(name="add")([L.ReLU(name="relu")(bn), conv])
    _, fusions, node = fusions_of(keras.Model(inputs, out))
    conv_fusion = fusions[id(node["conv"])]
    assert conv_fusion.batch_norm is None and conv_fusion.activation is None
    # The BN is then an op of its own, with the ReLU fused into it.
    bn_fusion = fusions[id(node["bn"])]
    assert bn_fusion is not conv_fusion and bn_fusion.head is node["bn"]
    assert bn_fusion.activation is node["relu"] and bn_fusion.activation_name == "relu"


def test_a_bn_read_twice_folds_but_fuses_no_activation():
    inputs = keras.Input((8, 8, 3))
    bn = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="conv")(inputs))
    out = L.Add(name="add")([L.ReLU(name="relu")(bn), bn])
    _, fusions, node = fusions_of(keras.Model(inputs, out))
    fusion = fusions[id(node["conv"])]
    assert fusion.batch_norm is node["bn"] and fusion.activation is None
    assert id(node["relu"]) not in fusions


def test_a_conv_whose_output_is_a_model_output_folds_no_bn():
    inputs = keras.Input((8, 8, 3))
    conv = L.Conv2D(4, 3, name="conv")(inputs)
    bn = L.BatchNormalization(name="bn")(conv)
    _, fusions, node = fusions_of(keras.Model(inputs, [conv, bn]))
    assert fusions[id(node["conv"])].batch_norm is None
    assert fusions[id(node["bn"])].head is node["bn"]


@pytest.mark.parametrize("skipped", ["conv", "bn", "relu"])
def test_a_layer_named_in_skip_does_not_fuse(skipped):
    model = chain(L.Conv2D(4, 3, name="conv"), L.BatchNormalization(name="bn"),
                  L.ReLU(name="relu"))
    _, fusions, node = fusions_of(model, skip=[skipped])
    assert id(node[skipped]) not in fusions
    if skipped == "conv":  # The BN becomes the head, the ReLU fuses into it.
        assert fusions[id(node["bn"])].head is node["bn"]
        assert fusions[id(node["bn"])].activation is node["relu"]
    elif skipped == "bn":  # Nothing follows the conv that it can absorb.
        assert fusions[id(node["conv"])].absorbed == []
    else:
        assert fusions[id(node["conv"])].batch_norm is node["bn"]
        assert fusions[id(node["conv"])].activation is None


def test_add_relu_fuses_and_concatenate_relu_does_not():
    inputs = keras.Input((4,))
    a = L.Dense(4, name="a")(inputs)
    b = L.Dense(4, name="b")(inputs)
    added = L.ReLU(name="add_relu")(L.Add(name="add")([a, b]))
    joined = L.ReLU(name="cat_relu")(L.Concatenate(name="cat")([a, added]))
    _, fusions, node = fusions_of(keras.Model(inputs, joined))
    fusion = fusions[id(node["add"])]
    assert fusion.head is node["add"] and fusion.batch_norm is None
    assert fusion.activation is node["add_relu"] and fusion.activation_name == "relu"
    # CONCATENATION takes no fused activation.
    assert id(node["cat"]) not in fusions and id(node["cat_relu"]) not in fusions


def test_keras_ops_add_and_relu_fuse():
    inputs = keras.Input((4,))
    a = L.Dense(4, name="a")(inputs)
    b = L.Dense(4, name="b")(inputs)
    out = keras.ops.relu(a + b)
    graph, fusions, _ = fusions_of(keras.Model(inputs, out))
    add, relu = graph.nodes[-2:]
    assert fusions[id(add)].head is add
    assert fusions[id(add)].activation is relu
    assert fusions[id(add)].activation_name == "relu"


def test_mean_takes_no_fused_activation():
    _, fusions, node = fusions_of(
        chain(L.GlobalAveragePooling2D(name="gap"), L.ReLU(name="relu"))
    )
    assert fusions == {}


def test_a_conv_with_its_own_relu_fuses_no_bn():
    model = chain(L.Conv2D(4, 3, activation="relu", name="conv"),
                  L.BatchNormalization(name="bn"), L.ReLU(name="relu"))
    _, fusions, node = fusions_of(model)
    fusion = fusions[id(node["conv"])]
    assert fusion.activation_name == "relu"
    assert fusion.batch_norm is None and fusion.activation is None
    assert fusion.tail is node["conv"]
    bn_fusion = fusions[id(node["bn"])]
    assert bn_fusion.head is node["bn"] and bn_fusion.activation is node["relu"]


def test_a_conv_with_a_non_fusable_activation_keeps_its_name():
    _, fusions, node = fusions_of(chain(L.Conv2D(4, 3, activation="sigmoid", name="conv"),
                                        L.BatchNormalization(name="bn")))
    assert fusions[id(node["conv"])].activation_name == "sigmoid"
    assert fusions[id(node["conv"])].batch_norm is None


def test_a_bn_over_another_axis_does_not_fold():
    _, fusions, node = fusions_of(chain(L.Conv2D(4, 3, name="conv"),
                                        L.BatchNormalization(axis=1, name="bn")))
    assert fusions[id(node["conv"])].batch_norm is None
    assert fusions[id(node["bn"])].head is node["bn"]


def test_a_bn_over_the_channel_axis_of_a_channels_first_conv_folds():
    _, fusions, node = fusions_of(
        chain(L.Conv2D(4, 3, data_format="channels_first", name="conv"),
              L.BatchNormalization(axis=1, name="bn"), shape=(3, 8, 8))
    )
    assert fusions[id(node["conv"])].batch_norm is node["bn"]


def test_depthwise_conv_bn_relu6_fuses():
    _, fusions, node = fusions_of(chain(L.DepthwiseConv2D(3, name="dw"),
                                        L.BatchNormalization(name="bn"),
                                        L.ReLU(6.0, name="relu6")))
    fusion = fusions[id(node["dw"])]
    assert fusion.batch_norm is node["bn"] and fusion.activation_name == "relu6"


def test_a_shared_conv_or_bn_folds_no_bn():
    a = keras.Input((8, 8, 3))
    b = keras.Input((8, 8, 3))
    conv = L.Conv2D(4, 3, name="conv")
    out = L.Add()([L.BatchNormalization(name="bn_a")(conv(a)),
                   L.BatchNormalization(name="bn_b")(conv(b))])
    graph, fusions, _ = fusions_of(keras.Model([a, b], out))
    for call in graph.calls[id(conv)]:
        assert fusions[id(call)].batch_norm is None

    bn = L.BatchNormalization(name="bn")
    out = L.Add()([bn(L.Conv2D(4, 3, name="c1")(a)), bn(L.Conv2D(4, 3, name="c2")(b))])
    graph, fusions, node = fusions_of(keras.Model([a, b], out))
    assert fusions[id(node["c1"])].batch_norm is None
    assert fusions[id(node["c2"])].batch_norm is None


def test_a_shared_layer_fuses_an_activation_only_if_every_call_does():
    inputs = keras.Input((4,))
    dense = L.Dense(4, name="shared")
    first = L.ReLU(name="relu")(dense(inputs))
    second = dense(L.Dense(4, name="pre")(inputs))  # No ReLU after this call.
    model = keras.Model(inputs, [first, second])
    graph, fusions, _ = fusions_of(model)
    names = {fusions[id(call)].activation_name for call in graph.calls[id(dense)]}
    assert names == {"linear"}
    # The QAT model computes the float model's function: the second call is
    # not clipped at zero.
    qat = qat_plugin.quantize_model(model)
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32") * 3
    expected, got = model.predict(x, verbose=0)[1], qat.predict(x, verbose=0)[1]
    assert expected.min() < 0 and got.min() < 0
    # Only the int8 weights differ: a few per cent of the output range.
    np.testing.assert_allclose(got, expected, atol=0.02 * np.abs(expected).max())
