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
"""

import dataclasses

import keras
from keras.src.models.functional import Functional

from qat_plugin import registry
from qat_plugin.errors import UnsupportedModelError


@dataclasses.dataclass(eq=False)
class OpNode:
    """One call of one layer in the flattened graph."""

    layer: keras.layers.Layer
    arguments: object  # keras SymbolicArguments of the original call
    scope: tuple
    inputs: list  # tensor keys, in the order of arguments.keras_tensors
    outputs: list  # tensor keys

    @property
    def name(self):
        return self.layer.name


@dataclasses.dataclass
class GraphInput:
    key: tuple
    tensor: object  # the original model's input KerasTensor
    name: str


class LayerGraph:
    """The flattened graph: inputs, nodes in topological order, outputs."""

    def __init__(self, inputs, nodes, outputs, inputs_struct, outputs_struct,
                 name):
        self.inputs = inputs
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

        `keep`: names of Lambda layers to keep as one node (not traced).
        """
        functional = _functional_of(model)
        aliases = {}
        nodes = []
        inputs = [
            GraphInput(key=((), id(t)), tensor=t, name=t._keras_history.operation.name)
            for t in functional.inputs
        ]
        _inline(functional, (), aliases, nodes, frozenset(keep))
        outputs = [_resolve(aliases, ((), id(t))) for t in functional.outputs]
        return cls(
            inputs,
            nodes,
            outputs,
            functional._inputs_struct,
            functional._outputs_struct,
            model.name,
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
        f"({type(model).__name__}); its graph cannot be traced. qat_plugin "
        "supports Sequential and Functional models (nested ones too): build "
        "the model with `keras.Input` and layer calls, or quantize the "
        "Functional sub-models it is made of."
    )


def _resolve(aliases, key):
    while key in aliases:
        key = aliases[key]
    return key


def _ordered_nodes(functional):
    depths = sorted(functional._nodes_by_depth, reverse=True)
    for depth in depths:
        yield from functional._nodes_by_depth[depth]


def traced_lambda(layer, arguments):
    """The Functional graph of a Lambda's function, or None.

    The function runs on symbolic inputs shaped like the call's
    (`arguments`, a Keras node's); the graph is returned only where every
    operation it records has a registry row.

    Examples:
        >>> import keras
        >>> x = keras.Input((4,))
        >>> y = keras.layers.Lambda(lambda t: keras.ops.relu(t) * 2.0)(x)
        >>> node = y._keras_history.operation._inbound_nodes[0]
        >>> traced = traced_lambda(node.operation, node.arguments)
        >>> [type(op).__name__ for op in traced.operations][1:]
        ['Relu', 'Multiply']
    """
    tensors = arguments.keras_tensors
    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype) for t in tensors]
    args, kwargs = arguments.fill_in({id(t): i for t, i in zip(tensors, inputs)})
    try:
        traced = Functional(inputs, layer.call(*args, **kwargs))
    except Exception:  # The function is not made of keras.ops: keep it float.
        return None
    recorded = [op for op in traced.operations
                if not isinstance(op, keras.layers.InputLayer)]
    if not all(registry.policy_for(op) is not None for op in recorded):
        return None
    return traced


def _traceable(layer):
    """A Lambda, or an Activation holding a function with no Keras name."""
    return type(layer) is keras.layers.Lambda or (
        type(layer) is keras.layers.Activation
        and not registry.holds_registered_activation(layer)
    )


def _inline(functional, scope, aliases, nodes, keep):
    for node in _ordered_nodes(functional):
        if node.is_input:
            continue
        layer = node.operation
        input_keys = [
            _resolve(aliases, (scope, id(t))) for t in node.arguments.keras_tensors
        ]
        inner = None
        if isinstance(layer, keras.Model):
            inner = _functional_of(layer)
        elif _traceable(layer) and layer.name not in keep:
            inner = traced_lambda(layer, node.arguments)
        if inner is not None:
            inner_scope = scope + (id(node),)
            for inner_input, key in zip(inner.inputs, input_keys):
                aliases[(inner_scope, id(inner_input))] = key
            _inline(inner, inner_scope, aliases, nodes, keep)
            for outer, inner_output in zip(node.outputs, inner.outputs):
                aliases[(scope, id(outer))] = _resolve(
                    aliases, (inner_scope, id(inner_output))
                )
            continue
        nodes.append(
            OpNode(
                layer=layer,
                arguments=node.arguments,
                scope=scope,
                inputs=input_keys,
                outputs=[(scope, id(t)) for t in node.outputs],
            )
        )
