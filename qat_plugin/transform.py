"""`quantize_model`: rebuilds a Keras 3 model with fake-quant for QAT."""

import keras
from keras import tree

from qat_plugin import registry
from qat_plugin.fusion import find_fusions
from qat_plugin.graph import LayerGraph
from qat_plugin.layers import (
    FakeQuant,
    QuantizedBatchNormalization,
    QuantizedLinear,
    QuantizeOutputWrapper,
)
from qat_plugin.quantizers import FIXED_RANGES
from qat_plugin.recipes import resolve


class UnsupportedLayerError(ValueError):
    """A layer has no quantization policy in the registry."""


def quantize_model(model, recipe="int8", *, skip=()):
    """Returns a copy of `model` ready for quantization-aware training.

    The copy computes what the fully-int8 TFLite model will compute: one
    fake-quant on each tensor that is int8 on the device and none elsewhere.
    Conv/Dense kernels are folded with the BatchNormalization after them and
    fake-quantized per output channel; ReLU/ReLU6 are fused into the op
    before them; Concatenate inputs share the output's range; pooling,
    reshapes and padding keep their input's range. Nested models are
    inlined, shared layers stay shared. `model` and its weights are not
    changed. Train the copy with `fit` (a small learning rate, starting from
    the trained float weights), then export it with `export_tflite`.

    Args:
        model: a Keras 3 Sequential or Functional model (nested models,
            shared layers and several inputs/outputs are fine).
        recipe: a built-in recipe name (see `qat_plugin.recipes.names()`),
            a path to a recipe TOML file, or a `Recipe`.
        skip: names of layers to keep in float. The export then holds a
            float island with QUANTIZE/DEQUANTIZE around it.

    Returns:
        A new Functional `keras.Model`.

    Example:

    >>> import keras, qat_plugin
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 1)),
    ...     keras.layers.Conv2D(4, 3),
    ...     keras.layers.BatchNormalization(),
    ...     keras.layers.ReLU(),
    ...     keras.layers.GlobalAveragePooling2D(),
    ...     keras.layers.Dense(2),
    ... ])
    >>> qat = qat_plugin.quantize_model(model)
    >>> [type(layer).__name__ for layer in qat.layers][1:]
    ['FakeQuant', 'QuantizedLinear', 'QuantizeOutputWrapper', 'QuantizedLinear']
    """
    scheme = resolve(recipe).quantization
    graph = LayerGraph.from_model(model)
    skip = set(skip)
    known = {node.name for node in graph.nodes}
    unknown = sorted(skip - known)
    if unknown:
        raise ValueError(
            f"skip names layers that are not in model '{model.name}': "
            f"{unknown}. Layer names: {sorted(known)}."
        )
    _check_registered(graph, skip)
    return _Builder(graph, scheme, skip).build()


def _check_registered(graph, skip):
    for node in graph.nodes:
        if node.name in skip or registry.policy_for(node.layer) is not None:
            continue
        layer = node.layer
        kind = (
            "a keras.ops call recorded by the Functional API"
            if not isinstance(layer, keras.layers.Layer)
            else f"class {type(layer).__module__}.{type(layer).__name__}"
        )
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' ({kind}) has no quantization policy. Keep "
            f"it in float with quantize_model(..., skip=['{layer.name}']), or "
            f"declare how it quantizes with qat_plugin.register_layer("
            f"{type(layer).__name__}, policy) where policy is 'passthrough', "
            "'output' or 'shared_scale'."
        )


def _clone(layer):
    return type(layer).from_config(layer.get_config())


class _Builder:
    """Rebuilds the graph with quantized layers, then copies the weights."""

    def __init__(self, graph, scheme, skip):
        self.graph = graph
        self.scheme = scheme
        self.skip = skip
        self.fusions = find_fusions(graph, skip)
        self.tensors = {}
        self.new_layers = {}  # key (id of the original layer) -> new layer
        self.weight_pairs = []  # (original layer, its copy in the new model)
        self.names = {node.name for node in graph.nodes}

    def _unique(self, name):
        candidate, n = name, 1
        while candidate in self.names:
            candidate = f"{name}_{n}"
            n += 1
        self.names.add(candidate)
        return candidate

    def _copy(self, layer):
        copy = _clone(layer)
        self.weight_pairs.append((layer, copy))
        return copy

    def _quantizer_kwargs(self):
        return {
            "num_bits": self.scheme.activation_bits,
            "ema_decay": self.scheme.ema_decay,
        }

    def _fake_quant(self, name):
        return FakeQuant(name=self._unique(name), **self._quantizer_kwargs())

    def build(self):
        new_inputs = []
        for graph_input in self.graph.inputs:
            t = graph_input.tensor
            new_input = keras.Input(
                batch_shape=t.shape, dtype=t.dtype, name=graph_input.name
            )
            new_inputs.append(new_input)
            value = new_input
            if "float" in str(t.dtype):
                value = self._fake_quant(f"{graph_input.name}_quantize")(value)
            self.tensors[graph_input.key] = value
        for node in self.graph.nodes:
            self._build_node(node)
        outputs = [self.tensors[key] for key in self.graph.outputs]
        outputs = tree.pack_sequence_as(self.graph.outputs_struct, outputs)
        inputs = tree.pack_sequence_as(self.graph.inputs_struct, new_inputs)
        model = keras.Model(inputs, outputs, name=self.graph.name)
        for original, copy in self.weight_pairs:
            copy.set_weights(original.get_weights())
        return model

    def _call(self, layer, node):
        values = {
            id(t): self.tensors[key]
            for t, key in zip(node.arguments.keras_tensors, node.inputs)
        }
        args, kwargs = node.arguments.fill_in(values)
        return layer(*args, **kwargs)

    def _layer_for(self, key, make):
        """Returns the new layer for `key`, made once: shared layers stay shared."""
        if key not in self.new_layers:
            self.new_layers[key] = make()
        return self.new_layers[key]

    def _build_node(self, node):
        fusion = self.fusions.get(id(node))
        if fusion is not None and node is not fusion.head:
            return  # Built with its head.
        if node.name in self.skip:
            self._build_float(node)
            return
        policy = registry.policy_for(node.layer)
        if policy == registry.LINEAR:
            self._build_linear(node, fusion)
        elif policy == registry.BATCH_NORM:
            layer = self._layer_for(
                id(node.layer),
                lambda: QuantizedBatchNormalization(
                    self._copy(node.layer),
                    activation=fusion.activation_name,
                    name=node.name,
                    **self._quantizer_kwargs(),
                ),
            )
            self.tensors[fusion.tail.outputs[0]] = self._call(layer, node)
        elif policy == registry.ACTIVATION:
            self._build_activation(node)
        elif policy in (registry.OUTPUT, registry.SHARED_SCALE):
            activation = fusion.activation_name if fusion else "linear"
            tail = fusion.tail if fusion else node
            layer = self._layer_for(
                id(node.layer),
                lambda: QuantizeOutputWrapper(
                    self._copy(node.layer),
                    activation=activation,
                    name=node.name,
                    **self._quantizer_kwargs(),
                ),
            )
            self.tensors[tail.outputs[0]] = self._call(layer, node)
        else:  # PASSTHROUGH
            layer = self._layer_for(id(node.layer), lambda: self._copy(node.layer))
            self._store_outputs(node, self._call(layer, node))

    def _store_outputs(self, node, outputs):
        for key, value in zip(node.outputs, tree.flatten(outputs)):
            self.tensors[key] = value

    def _feeds_only_shared_scale(self, node):
        """True when every reader of `node`'s output adopts a shared scale."""
        keys = [n.outputs[0] for n in self.graph.calls[id(node.layer)]]
        for key in keys:
            if key in self.graph.output_keys:
                return False
            consumers = self.graph.consumers.get(key, [])
            if not consumers:
                return False
            for consumer in consumers:
                if consumer.name in self.skip or (
                    registry.policy_for(consumer.layer) != registry.SHARED_SCALE
                ):
                    return False
        return True

    def _build_linear(self, node, fusion):
        own_activation = registry.function_name(node.layer.activation)
        split = own_activation not in registry.FUSABLE_ACTIVATIONS
        activation_name = "linear" if split else fusion.activation_name
        tail = fusion.tail
        layer = self._layer_for(
            node,
            lambda: QuantizedLinear(
                self._copy(node.layer),
                batch_norm=None
                if fusion.batch_norm is None
                else self._copy(fusion.batch_norm.layer),
                activation=activation_name,
                quantize_output=split
                or not self._feeds_only_shared_scale(fusion.tail),
                per_channel=self.scheme.per_channel,
                weight_bits=self.scheme.weight_bits,
                name=node.name,
                **self._quantizer_kwargs(),
            ),
        )
        outputs = self._call(layer, node)
        if split:
            activation = keras.layers.Activation(
                own_activation, name=f"{node.name}_activation"
            )
            wrapper = self._layer_for(
                ("activation", id(node.layer)),
                lambda: QuantizeOutputWrapper(
                    activation,
                    fixed_range=FIXED_RANGES.get(own_activation),
                    name=self._unique(f"{node.name}_activation"),
                    **self._quantizer_kwargs(),
                ),
            )
            outputs = wrapper(outputs)
        self.tensors[tail.outputs[0]] = outputs

    def _build_activation(self, node):
        name = registry.activation_name(node.layer)
        if name == "linear":
            layer = self._layer_for(id(node.layer), lambda: self._copy(node.layer))
        else:
            layer = self._layer_for(
                id(node.layer),
                lambda: QuantizeOutputWrapper(
                    self._copy(node.layer),
                    fixed_range=FIXED_RANGES.get(name),
                    name=node.name,
                    **self._quantizer_kwargs(),
                ),
            )
        self._store_outputs(node, self._call(layer, node))

    def _build_float(self, node):
        """A layer kept in float; its output is re-quantized where needed."""
        layer = self._layer_for(id(node.layer), lambda: self._copy(node.layer))
        outputs = tree.flatten(self._call(layer, node))
        for key, value in zip(node.outputs, outputs):
            readers = self.graph.consumers.get(key, [])
            needs_int8 = key in self.graph.output_keys or any(
                reader.name not in self.skip for reader in readers
            )
            if needs_int8 and "float" in str(value.dtype):
                value = self._layer_for(
                    ("float_exit", key),
                    lambda: self._fake_quant(f"{node.name}_quantize"),
                )(value)
            self.tensors[key] = value
