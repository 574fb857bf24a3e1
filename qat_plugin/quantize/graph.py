"""A flat view of a Keras 3 model's layer graph, nested models inlined.

Fusion needs to see a layer's consumers (Conv -> BatchNorm -> ReLU) and the
quantization plan needs to see every tensor, across the boundaries of
nested models. `LayerGraph.from_model` walks a Functional or Sequential
model's nodes in topological order and inlines each nested Functional or
Sequential model it calls, so the result is one graph of plain layers.

Tensors are named by keys `(scope, id(keras_tensor))`: the scope tells apart
two calls of the same nested model, whose inner tensors are the same
objects.

A `Lambda` layer is traced: its function is called on symbolic inputs, and
where that records only `keras.ops` calls (and layers) with registry rows,
the recorded graph is inlined like a nested model, so the Lambda quantizes
as the ops it computes. A Lambda that does not trace that way (TensorFlow
ops, an op with no row) or that `skip=` names stays one node, kept float.
An `Activation` holding a function Keras does not know by name (a Python
lambda) is traced the same way.

A composite layer (a layer with no registry row whose `call` runs
sublayers: MultiHeadAttention, keras-hub's TransformerEncoder, a user's
block, a subclassed model called in a Functional one) is traced the same
way: its `call` runs on symbolic inputs, so each sublayer call and each
`keras.ops` call in it records a node, and the recorded graph is inlined.
The QAT model is then built from those nodes: it computes exactly the ops
the converter sees, so each tensor the int8 kernels quantize inside the
block gets its fake-quant. Inlined nodes are named after the block
(`scoped_name`). A composite layer is not traced where its `call` needs
concrete sizes (a reshape with more than one unknown size) or uses weights
of its own outside sublayer calls (they would be frozen into constants):
it stays one node, and `quantize_model` names it with the reason. The
tracing itself is `quantize.tracing`. A Keras mask riding on an input of
a traced layer is computed in the graph too (`_materialized`).
"""

import dataclasses

import keras
from keras.src.models.functional import Functional

from qat_plugin.errors import UnsupportedModelError
from qat_plugin.quantize.tracing import inlined_graph, is_composite


@dataclasses.dataclass(eq=False)
class OpNode:
    """One call of one layer in the flattened graph."""

    layer: keras.layers.Layer
    arguments: object  # keras SymbolicArguments of the original call
    scope: tuple
    inputs: list  # tensor keys, in the order of arguments.keras_tensors
    outputs: list  # tensor keys
    name: str = None  # inside a traced composite layer, see `scoped_name`

    def __post_init__(self):
        if self.name is None:
            self.name = self.layer.name


def is_masked_softmax(node):
    """True for a Softmax layer called with a mask (MultiHeadAttention's).

    Examples:
        >>> import keras
        >>> scores = keras.Input((2, 3))
        >>> mask = keras.Input((2, 3), dtype="bool")
        >>> y = keras.layers.Softmax()(scores, mask=mask)
        >>> node = y._keras_history.operation._inbound_nodes[0]
        >>> is_masked_softmax(OpNode(node.operation, node.arguments, (), [], []))
        True
    """
    if type(node.layer) is not keras.layers.Softmax:
        return False
    args, kwargs = node.arguments.args, node.arguments.kwargs
    return kwargs.get("mask", args[1] if len(args) > 1 else None) is not None


@dataclasses.dataclass
class GraphInput:
    key: tuple
    tensor: object  # the original model's input KerasTensor
    name: str


class LayerGraph:
    """The flattened graph: inputs, nodes in topological order, outputs."""

    def __init__(self, inputs, nodes, outputs, inputs_struct, outputs_struct,
                 name, untraced=None):
        self.inputs = inputs
        # {node name: why that composite layer was not traced}
        self.untraced = untraced or {}
        self.inputs_struct = inputs_struct
        self.nodes = nodes
        self.outputs = outputs
        self.outputs_struct = outputs_struct
        self.name = name
        self.producer = {}
        self.consumers = {}
        for node in nodes:
            for key in node.outputs:
                self.producer[key] = node
            for key in node.inputs:
                self.consumers.setdefault(key, [])
                if node not in self.consumers[key]:
                    self.consumers[key].append(node)
        self.output_keys = set(outputs)
        self.calls = {}
        for node in nodes:
            self.calls.setdefault(id(node.layer), []).append(node)

    def sole_consumer(self, key):
        """The only node reading `key`, if `key` is not also a model output."""
        consumers = self.consumers.get(key, [])
        if len(consumers) != 1 or key in self.output_keys:
            return None
        return consumers[0]

    def is_shared(self, layer):
        """True when `layer` is called more than once in the graph."""
        return len(self.calls.get(id(layer), [])) > 1

    @classmethod
    def from_model(cls, model, keep=frozenset()):
        """Traces `model` into a `LayerGraph`; raises on unsupported models.

        `keep`: names of Lambda or composite layers to keep as one node
        (not traced).
        """
        functional = _functional_of(model)
        aliases = {}
        nodes = []
        untraced = {}
        inputs = [
            GraphInput(key=((), id(t)), tensor=t, name=t._keras_history.operation.name)
            for t in functional.inputs
        ]
        _inline(functional, (), None, aliases, nodes, frozenset(keep), untraced,
                {graph_input.key for graph_input in inputs})
        outputs = [_resolve(aliases, ((), id(t))) for t in functional.outputs]
        return cls(
            inputs,
            nodes,
            outputs,
            functional._inputs_struct,
            functional._outputs_struct,
            model.name,
            untraced,
        )


def _functional_of(model):
    if not isinstance(model, keras.Model):
        module = type(model).__module__
        hint = ""
        if module.startswith(("tf_keras", "keras.src.engine", "tensorflow.python.keras")):
            hint = (
                " This looks like a Keras 2 (tf_keras) model: rebuild it with "
                "Keras 3 (`import keras`)."
            )
        raise UnsupportedModelError(
            f"quantize_model expects a Keras 3 model (keras.Sequential or a "
            f"Functional keras.Model), got {type(model).__module__}."
            f"{type(model).__name__}.{hint}"
        )
    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            raise UnsupportedModelError(
                f"Sequential model '{model.name}' has no known input shape, "
                "so its graph cannot be traced: start it with "
                "`keras.Input(shape=...)` or call `model.build(input_shape)`."
            )
        return functional
    if isinstance(model, Functional):
        return model
    raise UnsupportedModelError(
        f"Model '{model.name}' is a subclassed keras.Model "
        f"({type(model).__name__}): its inputs' shapes and dtypes are not "
        "recorded, so its graph cannot be traced on its own. Call it on "
        "`keras.Input`s in a Functional model, which is traced through its "
        "`call` like any composite layer: `inputs = keras.Input(shape=..., "
        "dtype=...)`, then `quantize_model(keras.Model(inputs, model(inputs)))`."
    )


def _resolve(aliases, key):
    while key in aliases:
        key = aliases[key]
    return key


def _ordered_nodes(functional):
    depths = sorted(functional._nodes_by_depth, reverse=True)
    for depth in depths:
        yield from functional._nodes_by_depth[depth]


def scoped_name(composite, name):
    """The name of sublayer `name` of a traced composite layer.

    `composite` is `(its name in the graph, its own name)`, or None at the
    top level. A sublayer named after its block (keras-hub's
    `block_0_conv1` in `block_0`) keeps its name there; another is
    prefixed with the block's (`mha_query`).

    Examples:
        >>> scoped_name(("encoder_mha", "mha"), "query")
        'encoder_mha_query'
        >>> scoped_name(("stage_block_0", "block_0"), "block_0_conv1")
        'stage_block_0_conv1'
    """
    if composite is None:
        return name
    scoped, own = composite
    if name.startswith(own + "_"):
        return scoped + name[len(own):]
    return f"{scoped}_{name}"


def _resolve_inner(layer, node, keep, untraced, name, composite):
    """(graph to inline, composite naming inside it), or (None, None) to
    keep the node's layer one node."""
    if isinstance(layer, (Functional, keras.Sequential)):
        return _functional_of(layer), composite
    if name in keep:
        return None, None
    inner, why = inlined_graph(layer, node.arguments)
    if why is not None:
        untraced[name] = why
    return inner, ((name, layer.name) if is_composite(layer) else composite)


def _materialized(tensor, scope, aliases, nodes, produced):
    """The key of `tensor` (a Keras mask), adding the ops that compute it.

    A mask a layer computes (`Embedding(mask_zero=True)`: NOT_EQUAL of the
    token ids) is no node's input in the Functional graph; a traced layer
    that reads it needs the ops computing it.
    """
    key = _resolve(aliases, (scope, id(tensor)))
    if key in produced:
        return key
    operation, node_index, _ = tensor._keras_history
    node = operation._inbound_nodes[node_index]
    if node.is_input:
        raise UnsupportedModelError(
            f"A Keras mask read by a layer comes from outside model: {tensor}.")
    inputs = [_materialized(t, scope, aliases, nodes, produced)
              for t in node.arguments.keras_tensors]
    outputs = [(scope, id(t)) for t in node.outputs]
    nodes.append(OpNode(layer=operation, arguments=node.arguments, scope=scope,
                        inputs=inputs, outputs=outputs))
    produced.update(outputs)
    return key


def _inline(functional, scope, composite, aliases, nodes, keep, untraced, produced):
    for node in _ordered_nodes(functional):
        if node.is_input:
            continue
        layer = node.operation
        input_keys = [
            _resolve(aliases, (scope, id(t))) for t in node.arguments.keras_tensors
        ]
        name = scoped_name(composite, layer.name)
        inner, inner_composite = _resolve_inner(
            layer, node, keep, untraced, name, composite)
        if inner is not None:
            inner_scope = scope + (id(node),)
            input_keys += [_materialized(mask, scope, aliases, nodes, produced)
                           for mask in getattr(inner, "outer_masks", ())]
            for inner_input, key in zip(inner.inputs, input_keys):
                aliases[(inner_scope, id(inner_input))] = key
            _inline(inner, inner_scope, inner_composite, aliases, nodes,
                    keep, untraced, produced)
            for outer, inner_output in zip(node.outputs, inner.outputs):
                aliases[(scope, id(outer))] = _resolve(
                    aliases, (inner_scope, id(inner_output))
                )
            continue
        outputs = [(scope, id(t)) for t in node.outputs]
        if all(key in produced for key in outputs):
            continue  # A mask added already for a traced layer reading it.
        nodes.append(
            OpNode(
                layer=layer,
                arguments=node.arguments,
                scope=scope,
                inputs=input_keys,
                outputs=outputs,
                name=name,
            )
        )
        produced.update(nodes[-1].outputs)
