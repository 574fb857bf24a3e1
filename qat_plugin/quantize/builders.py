"""One builder function per policy: how `quantize.build.Builder` builds a node.

A builder is a function `(builder, node, spec, fusion)` that creates the
node's quantized layer(s) once (shared layers stay shared) through the
`Builder`'s helpers, calls them on the new tensors and records their
outputs. `BUILDERS` maps each policy of `qat_plugin.layer_spec` to its
builder; a new policy adds one function here (or in a module of its own)
and one entry.
"""

import keras
from keras import tree

from qat_plugin import registry
from qat_plugin.config.constants import FUSED_ACTIVATIONS
from qat_plugin.layers import (
    QuantizedAffine,
    QuantizedBatchNormalization,
    QuantizedCustomLayer,
    QuantizedLinear,
    QuantizedMasking,
    QuantizedMaskedSoftmax,
    QuantizedRecurrent,
    QuantizeOutputWrapper,
)
from qat_plugin.errors import UnsupportedLayerError
from qat_plugin.quantize.build_transformer import TRANSFORMER_BUILDERS
from qat_plugin.quantize.graph import is_masked_softmax
from qat_plugin.quantize.plan import average_divisor, averages
from qat_plugin.quantize.weight_transforms import (
    composed,
    scaled_kernel,
    scaled_weights,
    shifted_bias,
)


def build_linear(builder, node, spec, fusion):
    """Conv/Dense with its folded BatchNorm, folded constants, fused activation."""
    plan = builder.plan
    own_activation = registry.function_name(node.layer.activation)
    split = own_activation not in FUSED_ACTIVATIONS
    activation_name = "linear" if split else fusion.activation_name
    tail = fusion.tail
    scale = plan.scale_folds.get(id(node))
    transform = None if scale is None else scaled_weights(scale)
    if id(node) in plan.bias_folds:
        constant, addition = plan.bias_folds[id(node)]
        transform = shifted_bias(constant)
        add_fusion = plan.fusions.get(id(addition))
        if add_fusion is not None:
            activation_name = add_fusion.activation_name
            tail = add_fusion.tail
        else:
            tail = addition
    if id(node) in plan.input_scale_folds:
        input_scale, _ = plan.input_scale_folds[id(node)]
        transform = composed(scaled_kernel(input_scale), transform)
    layer = builder.layer_for(
        id(node.layer),
        lambda: QuantizedLinear(
            builder.copy(node.layer, transform,
                         input_shape=node.arguments.keras_tensors[0].shape),
            batch_norm=None
            if fusion.batch_norm is None
            else builder.copy(fusion.batch_norm.layer),
            activation=activation_name,
            per_channel=builder.scheme.per_channel,
            weight_bits=builder.scheme.weight_bits,
            name=node.name,
            **builder.quantizer_kwargs(None if split else tail.outputs[0]),
        ),
    )
    outputs = builder.call(layer, node)
    if split:
        wrapper = builder.layer_for(
            ("activation", id(node.layer)),
            lambda: builder.quantized_activation(
                # The function itself: a registered one of a library's
                # ("keras_hub>gelu_approximate") is no activation name.
                keras.layers.Activation(
                    node.layer.activation, name=f"{node.name}_activation"
                ),
                own_activation,
                builder.unique(f"{node.name}_activation"),
                tail.outputs[0],
            ),
        )
        outputs = wrapper(outputs)
    builder.tensors[tail.outputs[0]] = outputs


def build_batch_norm(builder, node, spec, fusion):
    """A BatchNormalization with nothing to fold into: MUL, ADD."""
    layer = builder.layer_for(
        id(node.layer),
        lambda: QuantizedBatchNormalization(
            builder.copy(node.layer),
            activation=fusion.activation_name,
            name=node.name,
            **builder.quantizer_kwargs(fusion.tail.outputs[0]),
        ),
    )
    builder.tensors[fusion.tail.outputs[0]] = builder.call(layer, node)


# Merge layers that TensorFlow computes as a chain of binary ops, each
# with an output scale of its own in int8.
_CHAINED_MERGES = (keras.layers.Add, keras.layers.Multiply)


def _chain_heads(builder, node):
    """`Add()([a, b, c])` is ADD(ADD(a, b), c): the inner ops, quantized;
    returns the two inputs of the last one."""
    values = [builder.tensors[key] for key in node.inputs]
    merge = type(node.layer)
    for index in range(len(values) - 2):
        layer = builder.layer_for(
            ("chain", id(node.layer), index),
            lambda: QuantizeOutputWrapper(
                merge(), name=builder.unique(f"{node.name}_{index}"),
                **builder.quantizer_kwargs()),
        )
        values[:2] = [layer(values[:2])]
    return values


def build_output(builder, node, spec, fusion):
    """An op with one output fake-quant after its fused activation."""
    activation = fusion.activation_name if fusion else "linear"
    tail = fusion.tail if fusion else node
    if isinstance(node.layer, _CHAINED_MERGES) and len(node.inputs) > 2:
        last = builder.layer_for(id(node.layer), lambda: QuantizeOutputWrapper(
            type(node.layer)(), activation=activation, name=node.name,
            **builder.quantizer_kwargs(tail.outputs[0])))
        builder.tensors[tail.outputs[0]] = last(_chain_heads(builder, node))
        return
    layer = builder.layer_for(
        id(node.layer),
        lambda: QuantizeOutputWrapper(
            builder.copy_of(node),
            activation=activation,
            name=node.name,
            **builder.quantizer_kwargs(tail.outputs[0]),
        ),
    )
    builder.tensors[tail.outputs[0]] = builder.call(layer, node)


def build_passthrough(builder, node, spec, fusion):
    """An op keeping its input's scale; one that averages rounds to it."""
    if isinstance(node.layer, keras.layers.Masking):
        layer = builder.layer_for(id(node.layer), lambda: QuantizedMasking(
            node.layer.mask_value, name=node.name))
        builder.store_outputs(node, builder.call(layer, node))
        return
    if not averages(node.layer):
        layer = builder.layer_for(id(node.layer), lambda: builder.copy_of(node))
        outputs = builder.call(layer, node)
        inputs = [builder.tensors[key] for key in node.inputs]
        if _is_float(outputs) and inputs and not any(map(_is_float, inputs)):
            # An integer tensor made float (a mask) is quantized like an input.
            outputs = builder.layer_for(
                ("cast", id(node.layer)),
                lambda: builder.fake_quant(f"{node.name}_quantize", node.outputs[0]),
            )(outputs)
        builder.store_outputs(node, outputs)
        return
    layer = builder.layer_for(
        id(node.layer),
        lambda: QuantizeOutputWrapper(
            builder.copy_of(node),
            average_divisor=average_divisor(
                node.layer, builder.scheme.activation_bits
            ),
            name=node.name,
            **builder.quantizer_kwargs(node.outputs[0]),
        ),
    )
    builder.store_outputs(node, builder.call(layer, node))


def _is_float(tensor):
    return "float" in str(getattr(tensor, "dtype", ""))


def build_activation(builder, node, spec, fusion):
    """An activation not fused into the op before it."""
    name = spec.activation_for(node.layer)
    if is_masked_softmax(node):
        layer = builder.layer_for(id(node.layer), lambda: QuantizedMaskedSoftmax(
            axis=node.layer.axis, name=node.name,
            **builder.quantizer_kwargs(node.inputs[0])))
        scores, mask = (builder.tensors[key] for key in node.inputs)
        builder.store_outputs(node, layer(scores, mask))
        return
    if name == "linear":
        layer = builder.layer_for(id(node.layer), lambda: builder.copy_of(node))
    else:
        layer = builder.layer_for(
            id(node.layer),
            lambda: builder.quantized_activation(
                builder.copy_of(node), name, node.name, node.outputs[0]
            ),
        )
    builder.store_outputs(node, builder.call(layer, node))


def build_affine(builder, node, spec, fusion):
    """Rescaling / Normalization: MUL/ADD/SUB by constants, each fake-quantized."""
    layer = builder.wrapped(node, QuantizedAffine)
    builder.store_outputs(node, builder.call(layer, node))


def build_scaled_add(builder, node, spec, fusion):
    """`inputs[0] + inputs[1] * scale` as ADD, after a MUL unless folded."""
    shortcut, residual = (builder.tensors[key] for key in node.inputs)
    if id(node) not in builder.plan.folded_scales:
        scale = builder.layer_for(
            ("scale", id(node.layer)),
            lambda: QuantizeOutputWrapper(
                keras.layers.Rescaling(node.layer.scale),
                name=builder.unique(f"{node.name}_scale"),
                **builder.quantizer_kwargs(),
            ),
        )
        residual = scale(residual)
    add = builder.layer_for(
        id(node.layer),
        lambda: QuantizeOutputWrapper(
            keras.layers.Add(),
            activation=fusion.activation_name,
            name=node.name,
            **builder.quantizer_kwargs(fusion.tail.outputs[0]),
        ),
    )
    builder.tensors[fusion.tail.outputs[0]] = add([shortcut, residual])


def build_custom(builder, node, spec, fusion):
    """A user's layer, quantized as its `LayerQuantization` declares."""
    declared = spec.custom
    layer = builder.layer_for(
        id(node.layer),
        lambda: QuantizedCustomLayer(
            builder.copy(node.layer),
            weights=declared.weights,
            quantize_output=declared.has_output_quantizer,
            fixed_output_range=declared.fixed_output_range,
            weight_bits=builder.scheme.weight_bits,
            name=node.name,
            **builder.quantizer_kwargs(node.outputs[0]),
        ),
    )
    builder.store_outputs(node, builder.call(layer, node))


def check_recurrent_inputs(graph, skip=()):
    """Refuses a recurrent layer called with initial states.

    A mask (Masking, `Embedding(mask_zero=True)`) is supported: it is an
    input of the node besides the sequence.
    """
    for node in graph.nodes:
        if node.name in skip or registry.policy_for(node.layer) != registry.RECURRENT:
            continue
        masked = node.arguments.kwargs.get("mask") is not None
        if node.arguments.kwargs.get("initial_state") is not None or (
            len(node.inputs) > 1 + masked
        ):
            raise UnsupportedLayerError(
                f"Layer '{node.name}' ({type(node.layer).__name__}) gets initial "
                "states; its int8 export runs every time step from zero states. "
                "Remove the initial_state argument, or keep the layer in float "
                f"with quantize_model(..., skip=['{node.name}'])."
            )


def build_recurrent(builder, node, spec, fusion):
    """An LSTM, GRU, SimpleRNN or Bidirectional, unrolled into int8 ops."""
    layer = builder.layer_for(
        id(node.layer),
        lambda: QuantizedRecurrent(
            builder.copy(node.layer),
            weight_bits=builder.scheme.weight_bits,
            name=node.name,
            # Its hidden state joins the output's range group (Concatenate).
            **builder.quantizer_kwargs(node.outputs[0]),
        ),
    )
    builder.store_outputs(node, builder.call(layer, node))


def build_prelu(builder, node, spec, fusion):
    """PReLU as PRELU: alpha int8 with one scale, its own output scale.

    The converter writes PRELU's alpha with one scale per tensor (PTQ too,
    measured); a per-channel fake-quant would train on other values.
    """
    layer = builder.layer_for(
        id(node.layer),
        lambda: QuantizedCustomLayer(
            builder.copy(node.layer),
            weights={"alpha": None},
            weight_bits=builder.scheme.weight_bits,
            name=node.name,
            **builder.quantizer_kwargs(node.outputs[0]),
        ),
    )
    builder.store_outputs(node, builder.call(layer, node))


def build_float(builder, node, spec=None, fusion=None):
    """A layer kept in float; its output is re-quantized where needed."""
    layer = builder.layer_for(id(node.layer), lambda: builder.kept_float(node))
    outputs = tree.flatten(builder.call(layer, node))
    for key, value in zip(node.outputs, outputs):
        readers = builder.graph.consumers.get(key, [])
        needs_int8 = key in builder.graph.output_keys or any(
            not builder.plan.is_float(reader) for reader in readers
        )
        if needs_int8 and "float" in str(value.dtype):
            value = builder.layer_for(
                ("float_exit", key),
                lambda: builder.fake_quant(f"{node.name}_quantize", key),
            )(value)
        builder.tensors[key] = value


BUILDERS = {
    registry.LINEAR: build_linear,
    registry.BATCH_NORM: build_batch_norm,
    registry.OUTPUT: build_output,
    registry.SHARED_SCALE: build_output,
    registry.CHANNEL_SCALE: build_output,
    registry.PASSTHROUGH: build_passthrough,
    registry.ACTIVATION: build_activation,
    registry.AFFINE: build_affine,
    registry.SCALED_ADD: build_scaled_add,
    registry.CUSTOM: build_custom,
    registry.RECURRENT: build_recurrent,
    registry.PRELU: build_prelu,
    registry.FLOAT: build_float,
    **TRANSFORMER_BUILDERS,
}
