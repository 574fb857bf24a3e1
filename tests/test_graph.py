"""LayerGraph: a Functional/Sequential model flattened, nested models inlined."""

import keras
import pytest

import qat_plugin
from qat_plugin.quantize.graph import LayerGraph

L = keras.layers


def _names(graph):
    return [node.name for node in graph.nodes]


def _assert_topological(graph):
    seen = {graph_input.key for graph_input in graph.inputs}
    for node in graph.nodes:
        for key in node.inputs:
            assert key in seen, f"{node.name} reads a tensor not produced yet"
        seen.update(node.outputs)
    for key in graph.outputs:
        assert key in seen


def test_nodes_are_in_topological_order():
    inputs = keras.Input((6, 6, 2), name="image")
    # Layers created out of call order: the graph follows the data.
    head = L.Dense(3, name="head")
    merge = L.Concatenate(name="merge")
    a = L.Conv2D(2, 1, name="a")(inputs)
    b = L.Conv2D(2, 1, name="b")(L.ReLU(name="pre_b")(inputs))
    c = L.Add(name="add")([a, L.Conv2D(2, 1, name="a2")(a)])
    out = head(L.Flatten(name="flat")(merge([b, c])))
    graph = LayerGraph.from_model(keras.Model(inputs, out, name="diamond"))
    assert sorted(_names(graph)) == sorted(
        ["a", "pre_b", "b", "a2", "add", "merge", "flat", "head"]
    )
    _assert_topological(graph)
    names = _names(graph)
    assert names.index("a") < names.index("a2") < names.index("add") < names.index("merge")
    assert names[-2:] == ["flat", "head"]
    assert graph.name == "diamond"
    assert [i.name for i in graph.inputs] == ["image"]
    assert graph.producer[graph.outputs[0]].name == "head"
    # Producers and consumers agree with the nodes' own keys.
    merge_node = graph.nodes[names.index("merge")]
    for key in merge_node.inputs:
        assert graph.consumers[key] == [merge_node]
    a_node = graph.nodes[names.index("a")]
    assert [n.name for n in graph.consumers[a_node.outputs[0]]] == ["a2", "add"]
    assert [graph.producer[k].name for k in merge_node.inputs] == ["b", "add"]


def test_a_nested_sequential_is_inlined_with_scoped_keys():
    block = keras.Sequential(
        [keras.Input((4,)), L.Dense(4, name="inner_dense"), L.ReLU(name="inner_relu")],
        name="block",
    )
    inputs = keras.Input((4,))
    first = block(L.Dense(4, name="pre")(inputs))
    second = block(first)  # The same nested model, called twice.
    model = keras.Model(inputs, L.Add(name="add")([first, second]))
    graph = LayerGraph.from_model(model)
    assert _names(graph) == [
        "pre", "inner_dense", "inner_relu", "inner_dense", "inner_relu", "add"
    ]
    assert not any(isinstance(node.layer, keras.Model) for node in graph.nodes)
    _assert_topological(graph)
    pre, dense1, relu1, dense2, relu2, add = graph.nodes
    # The two calls see the same inner KerasTensors; their scopes tell
    # their keys apart.
    assert dense1.layer is dense2.layer and dense1.scope != dense2.scope
    assert dense1.outputs != dense2.outputs and relu1.outputs != relu2.outputs
    assert dense1.outputs[0][1] == dense2.outputs[0][1]  # Same KerasTensor id.
    # The inner model's inputs resolve to the outer tensors fed to it, and
    # its outputs to the inner producers.
    assert dense1.inputs == pre.outputs
    assert dense2.inputs == relu1.outputs
    assert add.inputs == relu1.outputs + relu2.outputs
    assert graph.is_shared(dense1.layer) and graph.is_shared(relu1.layer)
    assert not graph.is_shared(pre.layer)
    assert len(graph.calls[id(dense1.layer)]) == 2


def test_nested_functional_models_two_levels_deep_are_inlined():
    x = keras.Input((3,))
    inner = keras.Model(x, L.Dense(3, name="deep")(x), name="inner")
    y = keras.Input((3,))
    middle = keras.Model(y, L.ReLU(name="mid_relu")(inner(y)), name="middle")
    model = keras.Sequential([keras.Input((3,)), middle, L.Dense(2, name="out")])
    graph = LayerGraph.from_model(model)
    assert _names(graph) == ["deep", "mid_relu", "out"]
    deep, relu, out = graph.nodes
    assert deep.inputs == [graph.inputs[0].key]
    assert relu.inputs == deep.outputs and out.inputs == relu.outputs
    assert len(deep.scope) == 2 and len(relu.scope) == 1 and out.scope == ()
    _assert_topological(graph)


def test_a_model_output_that_is_a_nested_models_output_resolves_to_its_producer():
    x = keras.Input((3,))
    inner = keras.Model(x, L.Dense(2, name="inner_out")(x))
    inputs = keras.Input((3,))
    graph = LayerGraph.from_model(keras.Model(inputs, inner(inputs)))
    assert graph.producer[graph.outputs[0]].name == "inner_out"
    assert graph.output_keys == {graph.nodes[0].outputs[0]}


def test_several_inputs_and_outputs_keep_their_structure():
    a = keras.Input((2,), name="a")
    b = keras.Input((2,), name="b")
    total = L.Add(name="sum")([a, b])
    model = keras.Model({"a": a, "b": b}, [total, L.Dense(1, name="d")(total)])
    graph = LayerGraph.from_model(model)
    assert sorted(i.name for i in graph.inputs) == ["a", "b"]
    assert isinstance(graph.inputs_struct, dict) and set(graph.inputs_struct) == {"a", "b"}
    assert [graph.producer[k].name for k in graph.outputs] == ["sum", "d"]
    add = graph.nodes[0]
    assert set(add.inputs) == {i.key for i in graph.inputs}


def test_a_shared_layer_is_shared():
    a = keras.Input((4,))
    b = keras.Input((4,))
    shared = L.Dense(3, name="shared")
    other = L.Dense(3, name="other")
    out = L.Add()([shared(a), other(shared(b))])
    graph = LayerGraph.from_model(keras.Model([a, b], out))
    assert graph.is_shared(shared) and not graph.is_shared(other)
    calls = graph.calls[id(shared)]
    assert len(calls) == 2 and calls[0].outputs != calls[1].outputs
    assert {tuple(c.inputs) for c in calls} == {(i.key,) for i in graph.inputs}


def test_sole_consumer():
    inputs = keras.Input((4,))
    t = L.Dense(4, name="t")(inputs)
    read_twice = L.Dense(4, name="read_twice")(t)
    u = L.Dense(4, name="u")(read_twice)
    v = L.Dense(4, name="v")(read_twice)
    w = L.Add(name="w")([u, v])
    out = L.Dense(4, name="out")(w)
    same_twice = L.Multiply(name="square")([out, out])
    model = keras.Model(inputs, [same_twice, w])
    graph = LayerGraph.from_model(model)
    node = {n.name: n for n in graph.nodes}
    assert graph.sole_consumer(node["t"].outputs[0]) is node["read_twice"]
    assert graph.sole_consumer(node["read_twice"].outputs[0]) is None  # Two readers.
    assert graph.sole_consumer(node["u"].outputs[0]) is node["w"]
    assert graph.sole_consumer(node["w"].outputs[0]) is None  # Also a model output.
    assert graph.sole_consumer(node["square"].outputs[0]) is None  # Read by nobody.
    # One node reading a tensor twice is still its only consumer.
    assert graph.sole_consumer(node["out"].outputs[0]) is node["square"]
    assert graph.consumers[node["read_twice"].outputs[0]] == [node["u"], node["v"]]


def test_an_unbuilt_sequential_is_refused_with_what_to_do():
    model = keras.Sequential([L.Dense(2)], name="unbuilt")
    with pytest.raises(qat_plugin.UnsupportedModelError) as error:
        LayerGraph.from_model(model)
    message = str(error.value)
    assert "'unbuilt'" in message and "no known input shape" in message
    assert "keras.Input(shape=...)" in message and "model.build(input_shape)" in message
    model.build((None, 3))  # What the message says works.
    assert _names(LayerGraph.from_model(model)) == [model.layers[0].name]


class _Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(2)

    def call(self, x):
        return self.dense(x)


def test_a_subclassed_model_is_refused_with_what_to_do():
    model = _Subclassed(name="sub")
    model(keras.ops.ones((1, 3)))
    with pytest.raises(qat_plugin.UnsupportedModelError) as error:
        LayerGraph.from_model(model)
    message = str(error.value)
    assert "'sub' is a subclassed keras.Model (_Subclassed)" in message
    assert "quantize_model(keras.Model(inputs, model(inputs)))" in message
    assert isinstance(error.value, TypeError)  # Its built-in base.


def test_a_subclassed_model_nested_in_a_functional_one_is_traced_through_its_call():
    inner = _Subclassed(name="inner_sub")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, inner(inputs))
    graph = LayerGraph.from_model(model)
    assert [node.name for node in graph.nodes] == ["inner_sub_dense"]
    assert graph.nodes[0].layer is inner.dense


def test_a_layer_is_not_a_model():
    with pytest.raises(qat_plugin.UnsupportedModelError, match="expects a Keras 3 model"):
        LayerGraph.from_model(L.Dense(2))
