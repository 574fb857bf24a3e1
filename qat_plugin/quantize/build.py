"""Building the QAT model from a `Plan`.

`Builder.build()` walks the graph in order; every node that does not vanish
(fused into its chain's head, folded, an alias) or stay float is built by
the builder function of its policy (`quantize.builders.BUILDERS`). The
weights are copied after the model is built, through each layer's planned
weight transform.
"""

import inspect
import warnings

import keras
from keras import tree

from qat_plugin import registry
from qat_plugin.layers import FakeQuant, OperationLayer, QuantizeOutputWrapper
from qat_plugin.layers.activation import SPLIT_ACTIVATIONS
from qat_plugin.layers.operation import argument_template
from qat_plugin.quantize.tracing import concrete_output_shape
from qat_plugin.quantize.builders import BUILDERS, build_float
from qat_plugin.quantize.qat_model import QATModel
from qat_plugin.quantize.plan import check_activation_bits
from qat_plugin.quantizers import FIXED_RANGES


# A QAT model computes in float32 (see `quantize_model`).
_HALF_DTYPES = ("float16", "bfloat16")


def _clone(layer, name=None, input_shape=None):
    config = layer.get_config()
    if name is not None:
        config["name"] = name
    if isinstance(layer, keras.layers.EinsumDense) and input_shape is not None:
        # Concrete sizes, so the layers after it get concrete shapes too.
        config["output_shape"] = concrete_output_shape(
            layer.equation, config["output_shape"], input_shape)
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

    def copy(self, layer, transform=None, name=None, input_shape=None):
        """A fresh copy of `layer` (renamed `name`; an EinsumDense made
        concrete for `input_shape`); its weights (through `transform`)
        follow."""
        copy = _clone(layer, name, input_shape)
        self.weight_pairs.append((layer, copy, transform))
        return copy

    def kept_float(self, node):
        """The layer a node kept in float runs as in the QAT model.

        A layer without weights is the float model's layer itself: it is
        never rebuilt from its config, which a Lambda's Python function or
        some third-party layers (keras-hub's ViTPatchingAndEmbedding) do
        not survive. A layer with weights is a copy with the same weights,
        so training the QAT model leaves the float model alone; where its
        config does not rebuild it, it is the float model's layer too, and
        the two models then share those weights (a warning says so).
        """
        layer = node.layer
        if not isinstance(layer, keras.layers.Layer):
            return self.copy_of(node)
        half = layer.dtype_policy.compute_dtype in _HALF_DTYPES
        if not layer.weights and not half:
            return layer
        try:
            return self.copy(layer, name=node.name)
        except Exception as error:  # A third-party from_config failing.
            warnings.warn(
                f"Layer '{layer.name}' ({type(layer).__name__}) is kept float, "
                "and its config does not rebuild it "
                f"({type(error).__name__}: {str(error).splitlines()[0][:120]}): "
                "the QAT model uses the float model's layer itself, so the "
                "two models share its weights (training either changes both).",
                stacklevel=8,
            )
            return layer

    def copy_of(self, node):
        """A fresh layer computing what `node` computes.

        A `keras.ops` call recorded by a Functional model becomes an
        `OperationLayer` that keeps the call's constant arguments.
        """
        if isinstance(node.layer, keras.layers.Layer):
            # Named as the node: sublayers of two composite layers may
            # share a name (keras-hub names them).
            return self.copy(node.layer, name=node.name)
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

    def wrapped(self, node, cls):
        """`cls(copy of node's layer)`, made once, quantizing `node`'s output."""
        return self.layer_for(
            id(node.layer),
            lambda: cls(self.copy(node.layer), name=node.name,
                        **self.quantizer_kwargs(node.outputs[0])),
        )

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

        Swish (LOGISTIC, MUL) and hard sigmoid (ADD, MUL) are two int8
        ops; every other activation is one, with an observed or (sigmoid,
        softmax, tanh) fixed output range. `key` is the output tensor's.
        """
        kwargs = self.quantizer_kwargs(key)
        if name in SPLIT_ACTIVATIONS:
            return SPLIT_ACTIVATIONS[name](layer, name=layer_name, **kwargs)
        fixed_range = FIXED_RANGES.get(name)
        if fixed_range is not None:
            kwargs.pop("range_group", None)  # The kernel fixes the scale.
        return QuantizeOutputWrapper(
            layer, fixed_range=fixed_range, name=layer_name, **kwargs
        )
