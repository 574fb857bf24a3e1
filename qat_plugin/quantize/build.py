"""Building the QAT model from a `Plan`: one builder function per policy.

`Builder.build()` walks the graph in order; every node that does not vanish
(fused into its chain's head, folded, an alias) or stay float is built by
`BUILDERS[policy]`, a function `(builder, node, spec, fusion)` that creates
the node's quantized layer(s) once (shared layers stay shared), calls them
on the new tensors and records their outputs. The weights are copied after
the model is built, through each layer's planned weight transform.
"""

import inspect

import keras
from keras import tree

from qat_plugin import registry
from qat_plugin.config.constants import FUSED_ACTIVATIONS
from qat_plugin.layers import (
    FakeQuant,
    OperationLayer,
    QuantizedAffine,
    QuantizedBatchNormalization,
    QuantizedCustomLayer,
    QuantizedLinear,
    QuantizedSwish,
    QuantizeOutputWrapper,
)
from qat_plugin.layers.activation import GATED_ACTIVATIONS
from qat_plugin.layers.operation import argument_template
from qat_plugin.quantize.qat_model import QATModel
from qat_plugin.quantize.plan import average_divisor, averages, check_activation_bits
from qat_plugin.quantize.weight_transforms import (
    composed,
    scaled_kernel,
    scaled_weights,
    shifted_bias,
)
from qat_plugin.quantizers import FIXED_RANGES


# A QAT model computes in float32 (see `quantize_model`).
_HALF_DTYPES = ("float16", "bfloat16")


def _clone(layer):
    config = layer.get_config()
    if layer.dtype_policy.compute_dtype in _HALF_DTYPES:
        # Fake-quant mimics int8 arithmetic, which float16 cannot hold
        # exactly; the export holds no float16 op (a CAST pair otherwise).
        config["dtype"] = "float32"
    return type(layer).from_config(config)


class Builder:
    """Rebuilds the planned graph with quantized layers, then copies the weights."""

    def __init__(self, plan, scheme):
        self.plan = plan
        self.graph = plan.graph
        self.scheme = scheme
        self.tensors = {}
        self.new_layers = {}  # key (id of the original layer) -> new layer
        # (original layer, its copy in the new model, weight transform)
        self.weight_pairs = []
        self.names = {node.name for node in self.graph.nodes}

    def build(self):
        check_activation_bits(self.plan, self.scheme.activation_bits)
        new_inputs = []
        for graph_input in self.graph.inputs:
            t = graph_input.tensor
            new_input = keras.Input(
                batch_shape=t.shape, dtype=t.dtype, name=graph_input.name
            )
            new_inputs.append(new_input)
            value = new_input
            if "float" in str(t.dtype):
                value = self.fake_quant(
                    f"{graph_input.name}_quantize", graph_input.key
                )(value)
            self.tensors[graph_input.key] = value
        for node in self.graph.nodes:
            self._build_node(node)
        outputs = [self.tensors[key] for key in self.graph.outputs]
        outputs = tree.pack_sequence_as(self.graph.outputs_struct, outputs)
        inputs = tree.pack_sequence_as(self.graph.inputs_struct, new_inputs)
        model = QATModel(inputs, outputs, name=self.graph.name)
        for original, copy, transform in self.weight_pairs:
            weights = original.get_weights()
            copy.set_weights(weights if transform is None else transform(weights))
        return model

    def _build_node(self, node):
        plan = self.plan
        fusion = plan.fusions.get(id(node))
        if fusion is not None and node is not fusion.head:
            return  # Built with its head.
        if id(node) in plan.folded_additions:
            return  # Folded into the bias of the op before it.
        if id(node) in plan.aliases:
            self.tensors[node.outputs[0]] = self.tensors[node.inputs[0]]
            return
        if plan.is_float(node):
            build_float(self, node)
            return
        spec = registry.spec_for(node.layer)
        BUILDERS[spec.policy](self, node, spec, fusion)

    # -- helpers the builder functions share ------------------------------

    def unique(self, name):
        """`name`, or `name_N` where a layer of the graph has it already."""
        candidate, n = name, 1
        while candidate in self.names:
            candidate = f"{name}_{n}"
            n += 1
        self.names.add(candidate)
        return candidate

    def copy(self, layer, transform=None):
        """A fresh copy of `layer`; its weights (through `transform`) follow."""
        copy = _clone(layer)
        self.weight_pairs.append((layer, copy, transform))
        return copy

    def copy_of(self, node):
        """A fresh layer computing what `node` computes.

        A `keras.ops` call recorded by a Functional model becomes an
        `OperationLayer` that keeps the call's constant arguments.
        """
        if isinstance(node.layer, keras.layers.Layer):
            return self.copy(node.layer)
        template, _ = argument_template(node.arguments.args, node.arguments.kwargs)
        return OperationLayer(node.layer, arguments=template, name=node.name)

    def quantizer_kwargs(self, key=None):
        """Constructor arguments of a layer whose output is tensor `key`."""
        kwargs = {
            "num_bits": self.scheme.activation_bits,
            "ema_decay": self.scheme.ema_decay,
        }
        if key in self.plan.range_groups:
            kwargs["range_group"] = self.plan.range_groups[key]
        return kwargs

    def fake_quant(self, name, key):
        return FakeQuant(name=self.unique(name), **self.quantizer_kwargs(key))

    def layer_for(self, key, make):
        """Returns the new layer for `key`, made once: shared layers stay shared."""
        if key not in self.new_layers:
            self.new_layers[key] = make()
        return self.new_layers[key]

    def call(self, layer, node):
        """Calls the new `layer` as `node` called the original one."""
        if not isinstance(node.layer, keras.layers.Layer):
            tensors = [self.tensors[key] for key in node.inputs]
            return layer(tensors[0] if len(tensors) == 1 else tensors)
        values = {
            id(t): self.tensors[key]
            for t, key in zip(node.arguments.keras_tensors, node.inputs)
        }
        args, kwargs = node.arguments.fill_in(values)
        if not isinstance(layer, type(node.layer)):
            # A quantized wrapper takes the tensors, not the wrapped layer's
            # other call arguments (mask=None, ...).
            accepted = inspect.signature(layer.call).parameters
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        return layer(*args, **kwargs)

    def store_outputs(self, node, outputs):
        for key, value in zip(node.outputs, tree.flatten(outputs)):
            self.tensors[key] = value

    def quantized_activation(self, layer, name, layer_name, key):
        """The quantized form of activation `layer` computing `name`.

        Swish is two int8 ops (LOGISTIC, MUL); every other activation is
        one, with an observed or (sigmoid, softmax, tanh) fixed output range.
        `key` is the output tensor's.
        """
        kwargs = self.quantizer_kwargs(key)
        if name in GATED_ACTIVATIONS:
            return QuantizedSwish(layer, name=layer_name, **kwargs)
        fixed_range = FIXED_RANGES.get(name)
        if fixed_range is not None:
            kwargs.pop("range_group", None)  # The kernel fixes the scale.
        return QuantizeOutputWrapper(
            layer, fixed_range=fixed_range, name=layer_name, **kwargs
        )


# -- one builder function per policy ---------------------------------------


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
            builder.copy(node.layer, transform),
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
                keras.layers.Activation(
                    own_activation, name=f"{node.name}_activation"
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


def build_output(builder, node, spec, fusion):
    """An op with one output fake-quant after its fused activation."""
    activation = fusion.activation_name if fusion else "linear"
    tail = fusion.tail if fusion else node
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
    if not averages(node.layer):
        layer = builder.layer_for(id(node.layer), lambda: builder.copy_of(node))
        builder.store_outputs(node, builder.call(layer, node))
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


def build_activation(builder, node, spec, fusion):
    """An activation not fused into the op before it."""
    name = spec.activation_for(node.layer)
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
    layer = builder.layer_for(
        id(node.layer),
        lambda: QuantizedAffine(
            builder.copy(node.layer), name=node.name,
            **builder.quantizer_kwargs(node.outputs[0]),
        ),
    )
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


def build_float(builder, node, spec=None, fusion=None):
    """A layer kept in float; its output is re-quantized where needed."""
    layer = builder.layer_for(id(node.layer), lambda: builder.copy_of(node))
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
    registry.FLOAT: build_float,
}
