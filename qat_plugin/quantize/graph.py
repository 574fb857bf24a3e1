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
block gets its fake-quant. Inlined nodes are named
`<composite>_<sublayer>`. A composite layer is not traced where its `call`
needs concrete shapes (`ops.tile` by the batch size) or uses weights of its
own outside sublayer calls (they would be frozen into constants): it stays
one node, and `quantize_model` names it with the reason.
"""

import contextlib
import dataclasses
import math

import keras
from keras import tree
from keras.src.backend import get_keras_mask, set_keras_mask
from keras.src.layers.layer import CallSpec
from keras.src.models.functional import Functional
from keras.src.ops import numpy as numpy_ops

from qat_plugin import registry
from qat_plugin.errors import UnsupportedModelError
from qat_plugin.linear_ops import concrete_output_shape


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


def traced_call(layer, arguments):
    """The Functional graph `layer.call` records on symbolic inputs.

    The inputs are shaped like the call's (`arguments`, a Keras node's),
    and carry the same Keras masks. Outputs that are None (attention
    scores not asked for) are left out. Raises what `call` raises where it
    cannot run symbolically (TensorFlow ops, concrete shapes).

    Examples:
        >>> import keras
        >>> x = keras.Input((4,))
        >>> y = keras.layers.Lambda(lambda t: keras.ops.relu(t) * 2.0)(x)
        >>> node = y._keras_history.operation._inbound_nodes[0]
        >>> traced = traced_call(node.operation, node.arguments)
        >>> [type(op).__name__ for op in traced.operations][1:]
        ['Relu', 'Multiply']
    """
    tensors = arguments.keras_tensors
    # One Input per argument, as the node's inputs are listed (a tensor
    # passed twice, as query and value, maps to its last Input).
    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype) for t in tensors]
    by_id = {id(t): i for t, i in zip(tensors, inputs)}
    # Keras masks ride on the tensors (MultiHeadAttention reads its query's):
    # a mask that is no argument of the call becomes an input of its own,
    # listed in `outer_masks`, so the traced graph computes with it.
    outer_masks = []
    for t in tensors:
        mask = get_keras_mask(t)
        if mask is not None and id(mask) not in by_id:
            by_id[id(mask)] = keras.Input(batch_shape=mask.shape, dtype=mask.dtype)
            outer_masks.append(mask)
        if mask is not None:
            set_keras_mask(by_id[id(t)], by_id[id(mask)])
    args, kwargs = arguments.fill_in(by_id)
    kwargs.update(_mask_arguments(layer, args, kwargs))
    with _concrete_einsum_shapes():
        outputs = [t for t in tree.flatten(layer.call(*args, **kwargs))
                   if t is not None]
    traced = Functional(inputs + [by_id[id(m)] for m in outer_masks], outputs)
    traced.outer_masks = outer_masks
    return traced


def _mask_arguments(layer, args, kwargs):
    """The mask arguments `Layer.__call__` would fill in from the tensors.

    A Keras node records the call's own arguments; `__call__` adds `mask`
    (one tensor argument) or `<argument>_mask` (MultiHeadAttention's
    `value_mask`) from the tensors' Keras masks each time it runs. A traced
    `call` gets them the same way.
    """
    if not isinstance(layer, keras.layers.Layer):
        return {}
    spec = CallSpec(layer._call_signature, layer._call_context_args, list(args),
                    dict(kwargs))
    tensors = spec.tensor_arguments_dict
    names = ["mask"] if len(tensors) == 1 else [f"{name}_mask" for name in tensors]
    values = (list(tensors.values()) if len(tensors) > 1
              else list(tensors.values())[:1])
    return {
        name: tree.map_structure(get_keras_mask, value)
        for name, value in zip(names, values)
        if name in spec.argument_names and spec.arguments_dict.get(name) is None
        and any(m is not None for m in tree.flatten(
            tree.map_structure(get_keras_mask, value)))
    }


@contextlib.contextmanager
def _concrete_einsum_shapes():
    """EinsumDense infers concrete output sizes while a layer is traced.

    Keras' own inference leaves a projection's sequence length None
    (`output_shape=(None, heads, dim)`), and MultiHeadAttention's causal
    mask is then `ops.ones` of a None size, which fails; Keras itself
    computes the shapes by running the whole block, so they are concrete.
    """
    original = keras.layers.EinsumDense.compute_output_shape

    def compute_output_shape(self, input_shape):
        return concrete_output_shape(
            self.equation, original(self, input_shape), input_shape)

    keras.layers.EinsumDense.compute_output_shape = compute_output_shape
    try:
        yield
    finally:
        keras.layers.EinsumDense.compute_output_shape = original


def _traced_lambda(layer, arguments):
    """A Lambda's graph where every op it records has a row, else None (float)."""
    try:
        traced = traced_call(layer, arguments)
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


def is_composite(layer):
    """True for a layer with no registry row whose `call` runs sublayers.

    Examples:
        >>> import keras
        >>> is_composite(keras.layers.MultiHeadAttention(2, 4))
        True
        >>> is_composite(keras.layers.Dense(3))
        False
    """
    if not isinstance(layer, keras.layers.Layer) or registry.spec_for(layer) is not None:
        return False
    if isinstance(layer, (Functional, keras.Sequential)):
        return False  # Inlined as nested models.
    return any(True for _ in layer._flatten_layers(include_self=False))


def _traced_composite(layer, arguments):
    """(graph, None) for a composite layer that traces, else (None, why)."""
    try:
        traced = traced_call(layer, arguments)
    except Exception as error:
        return None, (
            "its call does not run on symbolic tensors "
            f"({type(error).__name__}: {str(error).splitlines()[0][:160]})"
        )
    for op in traced.operations:
        if not _batch_free_reshape(op):
            return None, (
                f"its call reshapes to {op.newshape}, a shape with more than "
                "one unknown size (it reads sizes of symbolic tensors)"
            )
    reached = {id(w) for op in traced.operations for w in getattr(op, "weights", ())}
    frozen = [w.path for w in layer.weights if id(w) not in reached]
    if frozen:
        return None, (
            f"its call uses weights outside sublayer calls ({frozen[:3]}), "
            "which a traced graph would freeze into constants"
        )
    return traced, None


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


def _batch_free_reshape(op):
    """False for a reshape to a shape that cannot be made concrete.

    A block that reshapes to `(ops.shape(x)[0], -1, c)` records the batch
    size as None on symbolic tensors. Where the batch size is the one
    unknown size of the input, the None stands for it: the other sizes
    are computed from the input's, and the batch becomes -1 (set here, on
    the traced op), as it is at run time.
    """
    if type(op) is not numpy_ops.Reshape:
        return True
    shape = list(op.newshape) if isinstance(op.newshape, (list, tuple)) else [op.newshape]
    if None not in shape:
        return True
    source = op._inbound_nodes[0].arguments.keras_tensors[0].shape
    if shape.count(None) > 1 or shape[0] is not None or source[0] is not None or (
            None in source[1:]):
        return False
    if -1 in shape:
        known = math.prod(size for size in shape[1:] if size != -1)
        shape[shape.index(-1)] = math.prod(source[1:]) // known
    op.newshape = tuple([-1] + shape[1:])
    return True


def _resolve_inner(layer, node, keep, untraced, name, composite):
    """(graph to inline, composite naming inside it), or (None, None) to
    keep the node's layer one node."""
    if isinstance(layer, (Functional, keras.Sequential)):
        return _functional_of(layer), composite
    if name in keep:
        return None, None
    if _traceable(layer):
        return _traced_lambda(layer, node.arguments), composite
    if is_composite(layer):
        inner, why = _traced_composite(layer, node.arguments)
        if why is not None:
            untraced[name] = why
        return inner, (name, layer.name)
    return None, None


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
