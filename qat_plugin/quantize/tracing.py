"""Tracing a layer's `call` into a graph of the ops it runs.

A Lambda's function, an Activation holding a Python function and a
composite layer (a layer with no registry row whose `call` runs
sublayers) are called on symbolic inputs: each sublayer call and each
`keras.ops` call records a node, and `quantize.graph` inlines the recorded
graph in place of the layer. A hard sigmoid is rewritten as the ops the
converter lowers it to. See `inlined_graph`.
"""

import contextlib
import math

import keras
from keras import tree
from keras.src.backend import get_keras_mask, set_keras_mask
from keras.src.layers import layer as layer_module
from keras.src.layers.layer import CallSpec
from keras.src.models.functional import Functional
from keras.src.ops import numpy as numpy_ops
from keras.src.ops.node import Node

from qat_plugin import registry
from qat_plugin.linear_ops import einsum_parts


def concrete_output_shape(equation, output_shape, input_shape):
    """An EinsumDense `output_shape` with its None sizes read off the input.

    MultiHeadAttention builds its projections with `output_shape=(None,
    heads, dim)`: None is "the input's size" (the sequence length), which
    EinsumDense's own shape inference leaves None. An output letter found
    in the input takes the input's size; the batch letter stays None.

    Examples:
        >>> concrete_output_shape("abc,cde->abde", (None, 2, 4), (None, 6, 8))
        (6, 2, 4)
    """
    parts = einsum_parts(equation)
    if parts is None or output_shape is None:
        return output_shape
    inputs, _, outputs = parts
    shape = list(output_shape) if isinstance(output_shape, (list, tuple)) else [output_shape]
    # Sizes and letters align at the end: the output shape leaves out the
    # batch; a full shape has the axes `...` stands for in front.
    count = min(len(shape), len(outputs))
    offset = len(input_shape) - len(inputs)
    for index, letter in zip(range(len(shape) - count, len(shape)), outputs[-count:]):
        if shape[index] is None and letter in inputs:
            shape[index] = input_shape[offset + inputs.index(letter)]
    return tuple(shape)


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
    with _tracing_shims():
        outputs = [t for t in tree.flatten(layer.call(*args, **kwargs))
                   if isinstance(t, keras.KerasTensor)]
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
def _tracing_shims():
    """Three differences from Keras' own symbolic run, while a layer is traced.

    Keras computes a composite layer's output by running the whole block
    on backend tensors; tracing runs each sublayer on KerasTensors, where
    (1) EinsumDense leaves a projection's sequence length None
    (`output_shape=(None, heads, dim)`: "the input's size"), and
    MultiHeadAttention's causal mask is then `ops.ones` of a None size,
    which fails; here the size is read off the input; (2) a sublayer
    returning None beside its tensors (keras-hub DeiT's encoder blocks:
    `(x, None)` without attention scores) cannot be recorded as a node;
    here its node records the tensors only; (3) a reshape to
    `(ops.shape(x)[0], -1, c)` records the batch as None, and its output
    loses the sizes `-1` stands for; here they are computed
    (`_batch_free_shape`).
    """
    einsum_shape = keras.layers.EinsumDense.compute_output_shape
    reshape_spec = numpy_ops.Reshape.compute_output_spec

    def compute_reshape_spec(self, x):
        concrete = _batch_free_shape(self.newshape, x.shape)
        if concrete is not None:
            self.newshape = concrete
            # The op's config (what its copies are made from) is the
            # constructor's arguments, recorded by Keras.
            auto_config = getattr(self, "_auto_config", None)
            if auto_config is not None and "newshape" in auto_config.config:
                auto_config.config["newshape"] = concrete
        return reshape_spec(self, x)

    def compute_output_shape(self, input_shape):
        return concrete_output_shape(
            self.equation, einsum_shape(self, input_shape), input_shape)

    def node_of_tensors(operation, call_args=None, call_kwargs=None, outputs=None):
        return Node(operation, call_args, call_kwargs,
                    [t for t in tree.flatten(outputs) if isinstance(t, keras.KerasTensor)])

    keras.layers.EinsumDense.compute_output_shape = compute_output_shape
    numpy_ops.Reshape.compute_output_spec = compute_reshape_spec
    layer_module.Node = node_of_tensors  # Where Layer.__call__ records nodes.
    try:
        yield
    finally:
        keras.layers.EinsumDense.compute_output_shape = einsum_shape
        numpy_ops.Reshape.compute_output_spec = reshape_spec
        layer_module.Node = Node


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
        >>> x = keras.Input((6, 8))
        >>> mha = keras.layers.MultiHeadAttention(2, 4)
        >>> _ = mha(x, x)  # Its sublayers are made when it is built.
        >>> is_composite(mha)
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
        if type(op) is numpy_ops.Reshape and None in tree.flatten(op.newshape):
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


def _batch_free_shape(newshape, source):
    """`newshape` with the batch as -1, or None where it cannot be made so.

    A block that reshapes to `(ops.shape(x)[0], -1, c)` records the batch
    size as None on symbolic tensors. Where the batch size is the one
    unknown size of the input `source`, the None stands for it: the other
    sizes are computed from the input's, and the batch becomes -1, as it
    is at run time.

    Examples:
        >>> _batch_free_shape((None, -1, 8), (None, 4, 4, 8))
        (-1, 16, 8)
        >>> _batch_free_shape((None, -1, 8), (None, None, 8)) is None
        True
    """
    shape = list(newshape) if isinstance(newshape, (list, tuple)) else [newshape]
    if None not in shape:
        return tuple(shape)
    if shape.count(None) > 1 or shape[0] is not None or source[0] is not None or (
            None in source[1:]):
        return None
    if -1 in shape:
        known = math.prod(size for size in shape[1:] if size != -1)
        shape[shape.index(-1)] = math.prod(source[1:]) // known
    return tuple([-1] + shape[1:])


def _hard_sigmoid_ops(arguments):
    """A hard sigmoid as the ADD, RELU6, MUL the converter lowers it to.

    As nodes, the `+ 3` folds into the bias of a Conv/Dense before it and
    RELU6 fuses into it, as the converter's PTQ does (keras-hub
    MobileNetV3's squeeze-and-excite gate).
    """
    tensor = arguments.keras_tensors[0]
    inputs = keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype)
    return Functional([inputs], keras.ops.relu6(inputs + 3.0) * (1.0 / 6.0))



def _merged_softmax_ops(layer, arguments):
    """A Softmax over several trailing axes as RESHAPE, SOFTMAX, RESHAPE.

    Keras computes it as `exp(x - logsumexp(x))`, a chain of EXP, LOG,
    SUM, SUB, ... ops (MultiHeadAttention over two attention axes, as in
    keras.io's MobileViT). Merged into one axis it is one int8 SOFTMAX with
    its fixed range, the same function. None for any other layer, or a
    Softmax with a mask.
    """
    if type(layer) is not keras.layers.Softmax or not isinstance(layer.axis, (list, tuple)):
        return None
    args, kwargs = arguments.args, arguments.kwargs
    if kwargs.get("mask", args[1] if len(args) > 1 else None) is not None:
        return None
    tensor = arguments.keras_tensors[0]
    rank = len(tensor.shape)
    axes = sorted(axis % rank for axis in layer.axis)
    trailing = tensor.shape[rank - len(axes):]
    if len(axes) < 2 or axes != list(range(rank - len(axes), rank)) or None in trailing:
        return None
    inputs = keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype)
    kept = tuple(inputs.shape[1:rank - len(axes)])
    merged = keras.ops.reshape(inputs, (-1,) + kept + (math.prod(trailing),))
    outputs = keras.ops.reshape(keras.ops.softmax(merged, axis=-1),
                                (-1,) + kept + tuple(trailing))
    return Functional([inputs], outputs)


def inlined_graph(layer, arguments):
    """`(graph, why)`: the graph a call of `layer` is inlined as.

    `(graph, None)` for a Lambda or an Activation holding a Python function
    whose ops all have rows, a composite layer that traces, a hard
    sigmoid (ADD, RELU6, MUL) or a Softmax over several trailing axes
    (RESHAPE, SOFTMAX, RESHAPE); `(None, why)` for a composite layer that
    cannot be traced; `(None, None)` for a layer that stays one node.

    Examples:
        >>> import keras
        >>> x = keras.Input((6, 8))
        >>> mha = keras.layers.MultiHeadAttention(2, 4)
        >>> _ = mha(x, x)
        >>> graph, why = inlined_graph(mha, mha._inbound_nodes[0].arguments)
        >>> sorted({type(op).__name__ for op in graph.operations})
        ['DotProductAttention', 'EinsumDense', 'InputLayer']
    """
    if registry.activation_name(layer) == "hard_sigmoid":
        return _hard_sigmoid_ops(arguments), None
    merged = _merged_softmax_ops(layer, arguments)
    if merged is not None:
        return merged, None
    if _traceable(layer):
        return _traced_lambda(layer, arguments), None
    if is_composite(layer):
        return _traced_composite(layer, arguments)
    return None, None
