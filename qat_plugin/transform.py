"""`quantize_model`: rebuilds a Keras 3 model with fake-quant for QAT."""

import inspect
import math
import uuid

import keras
import numpy as np
from keras import tree
from keras.src.ops import numpy as _numpy_ops

from qat_plugin import registry
from qat_plugin.fusion import find_fusions
from qat_plugin.graph import LayerGraph
from qat_plugin.layers import (
    FakeQuant,
    LayerQuantization,
    OperationLayer,
    QuantizedAffine,
    QuantizedBatchNormalization,
    QuantizedCustomLayer,
    QuantizedLinear,
    QuantizedSwish,
    QuantizeOutputWrapper,
)
from qat_plugin.layers.activation import GATED_ACTIVATIONS
from qat_plugin.layers.affine import is_constant
from qat_plugin.layers.operation import argument_template
from qat_plugin.layers.pruned import PrunedLayer
from qat_plugin.quantizers import FIXED_RANGES, RangeGroup
from qat_plugin.recipes import resolve


class UnsupportedLayerError(ValueError):
    """A layer has no quantization policy in the registry."""


def quantize_model(model, recipe="int8", *, skip=()):
    """Returns a copy of `model` ready for quantization-aware training.

    The copy computes what the fully-int8 TFLite model will compute: one
    fake-quant on each tensor that is int8 on the device and none elsewhere.
    Conv/Dense kernels are folded with the BatchNormalization after them and
    fake-quantized per output channel; ReLU/ReLU6 are fused into the op
    before them; the tensors around a Concatenate, Maximum or Minimum
    share one range (a `RangeGroup`); pooling, reshapes and padding keep
    their input's range. Nested models are
    inlined, shared layers stay shared. `keras.ops` calls that a Functional
    model records (`x + 3.0`, `ops.silu(x)`) quantize like the matching
    layers, and constants the converter folds into a Conv/Dense (a
    following `+ c`, Inception-ResNet's residual scale, ConvNeXt's
    LayerScale) are folded into its quantized weights here too. Custom
    layers quantize as declared with `register_layer`. `model` and its
    weights are not changed. Train the copy with `fit` (a small learning
    rate, starting from the trained float weights), or set its ranges with
    `calibrate`, then export it with `export_tflite`.

    Args:
        model: a Keras 3 Sequential or Functional model (nested models,
            shared layers and several inputs/outputs are fine).
        recipe: a built-in recipe name (see `qat_plugin.recipes.names()`),
            a path to a recipe TOML file, or a `Recipe`.
        skip: names of layers to keep out of QAT (no fake-quant, no
            fusion). The export holds a float island with QUANTIZE /
            DEQUANTIZE around it wherever a skipped layer's output feeds
            another skipped layer; a lone skipped op between two int8
            tensors the converter still quantizes on its own (with
            post-training weight scales). `inspect_tflite(...).float_ops`
            lists what stays float.

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
            f"{type(layer).__name__}, policy) where policy is a "
            "qat_plugin.LayerQuantization(weights=..., ...) or one of "
            "'passthrough', 'output', 'shared_scale', 'float'."
        )


def _clone(layer):
    return type(layer).from_config(layer.get_config())


_AVERAGE_POOLINGS = (
    keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D,
    keras.layers.AveragePooling3D,
)


def _averages(layer):
    """True for a same-scale op whose outputs fall between its input's steps.

    AVERAGE_POOL_2D and RESIZE_BILINEAR keep their input's scale but round
    their outputs to it: QAT needs a fake-quant there, with the input's range.
    """
    return isinstance(layer, _AVERAGE_POOLINGS) or (
        isinstance(layer, keras.layers.UpSampling2D)
        and layer.interpolation != "nearest"
    )


def _average_divisor(layer, num_bits):
    """A multiple of every count an average pooling divides by, or None.

    "valid" pooling always averages `prod(pool_size)` values; "same"
    pooling fewer at the borders: per axis any of 1..pool_size, so the
    product of each axis's least common multiple. Snapping to `1 / divisor`
    steps is exact in float32 while `divisor * 2^(num_bits - 1)` stays
    below 2^22; past that the interior count is used.
    """
    if not isinstance(layer, _AVERAGE_POOLINGS):
        return None
    count = math.prod(layer.pool_size)
    if layer.padding == "valid":
        return count
    multiple = math.prod(math.lcm(*range(1, p + 1)) for p in layer.pool_size)
    return multiple if multiple <= 1 << (23 - num_bits) else count


_ZERO_PADDINGS = (
    keras.layers.ZeroPadding1D,
    keras.layers.ZeroPadding2D,
    keras.layers.ZeroPadding3D,
)

# Linear layers whose kernel's last axis is the output channel axis.
_SCALE_FOLDABLE = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Dense,
)


def _scaled_weights(scale):
    """Scales a Conv/Dense's output channels: kernel and bias times `scale`."""

    def transform(weights):
        return [w * scale for w in weights]

    return transform


def _scaled_kernel(scale):
    """Multiplies a linear layer's kernel (its first weight) by scalar `scale`."""

    def transform(weights):
        return [weights[0] * scale] + list(weights[1:])

    return transform


def _composed(*transforms):
    """Applies the weight transforms that are not None, left to right."""
    transforms = [t for t in transforms if t is not None]
    if not transforms:
        return None

    def transform(weights):
        for step in transforms:
            weights = step(weights)
        return weights

    return transform


def _reads_float(node):
    """True when `node`'s first input is a float tensor (a Rescaling of an
    integer input also casts it: it cannot simply vanish)."""
    return "float" in str(node.arguments.keras_tensors[0].dtype)


def _is_identity_affine(node):
    """True for a Rescaling or Normalization that leaves its input unchanged.

    Keras applications built with `weights=None` hold a Normalization with
    mean 0 and variance 1; the converter drops it, so QAT must not give it
    a fake-quant of its own.
    """
    layer = node.layer
    if isinstance(layer, keras.layers.Rescaling):
        pairs = ((layer.scale, 1.0), (layer.offset, 0.0))
    elif isinstance(layer, keras.layers.Normalization) and not layer.invert:
        pairs = ((layer.mean, 0.0), (layer.variance, 1.0))
    else:
        return False
    return _reads_float(node) and all(
        is_constant(keras.ops.convert_to_numpy(value), constant)
        for value, constant in pairs
    )


def _shifted_bias(constant):
    """Adds `constant` to a Conv/Dense's bias (weights `[kernel, bias]`)."""

    def transform(weights):
        bias = weights[1] + constant
        if bias.size > 1 and np.all(bias == bias.flat[0]) and bias.flat[0] != 0:
            # The converter quantizes a bias whose values are all equal (a
            # "splat" constant, e.g. a zero bias plus 3) with the first
            # channel's scale only, which corrupts every other channel
            # (measured). One ulp off on one channel keeps it a plain tensor.
            bias = bias.copy()
            bias.flat[-1] = np.nextafter(bias.flat[-1], np.inf, dtype=bias.dtype)
        return [weights[0], bias] + list(weights[2:])

    return transform


class _Builder:
    """Rebuilds the graph with quantized layers, then copies the weights."""

    def __init__(self, graph, scheme, skip):
        self.graph = graph
        self.scheme = scheme
        self.skip = skip
        self.fusions = find_fusions(graph, skip)
        self.tensors = {}
        self.new_layers = {}  # key (id of the original layer) -> new layer
        # (original layer, its copy in the new model, weight transform)
        self.weight_pairs = []
        self.names = {node.name for node in graph.nodes}
        self.scale_folds, self.folded_scales = self._plan_scale_folds()
        self.bias_folds = self._plan_bias_folds()
        self.folded_additions = {id(add) for _, add in self.bias_folds.values()}
        self.input_scale_folds = self._plan_input_scale_folds()
        self.aliases = self._plan_aliases()
        self.range_groups = self._plan_range_groups()

    def _unique(self, name):
        candidate, n = name, 1
        while candidate in self.names:
            candidate = f"{name}_{n}"
            n += 1
        self.names.add(candidate)
        return candidate

    def _copy(self, layer, transform=None):
        """A fresh copy of `layer`; its weights (through `transform`) follow."""
        copy = _clone(layer)
        self.weight_pairs.append((layer, copy, transform))
        return copy

    def _plan_scale_folds(self):
        """Finds the constant scales that fold into the Conv/Dense before them.

        The converter folds a multiplication by a constant into the weights
        of the convolution or fully-connected op producing its input
        (Inception-ResNet's residual scale, ConvNeXt's LayerScale); QAT must
        quantize the folded weights to export the same single op.

        Returns `({id(linear node): scale}, {id(scaling node)})`.
        """
        folds, folded = {}, set()
        for node in self.graph.nodes:
            policy = registry.policy_for(node.layer)
            if policy not in (registry.SCALED_ADD, registry.CHANNEL_SCALE):
                continue
            if self._is_float(node) or self.graph.is_shared(node.layer):
                continue
            if policy == registry.SCALED_ADD:
                if len(node.inputs) != 2 or node.inputs[0] == node.inputs[1]:
                    continue
                scaled_key = node.inputs[1]
                scale = float(node.layer.scale)
            else:
                scaled_key = node.inputs[0]
                scale = keras.ops.convert_to_numpy(node.layer.gamma)
            producer = self.graph.producer.get(scaled_key)
            if producer is not None and self._scale_folds_into(producer, node):
                folds[id(producer)] = scale
                folded.add(id(node))
        return folds, folded

    def _plan_bias_folds(self):
        """Finds `x + constant` ops that fold into the Conv/Dense bias before.

        The converter folds the addition of a constant into the bias of the
        op producing `x` (MobileNetV3's hard sigmoid, `relu6(conv + 3)`), and
        a ReLU/ReLU6 after the addition then fuses into that op.

        Returns `{id(linear node): (constant, addition node)}`.
        """
        folds = {}
        for node in self.graph.nodes:
            if type(node.layer) is not _numpy_ops.Add or self._is_float(node):
                continue
            args = node.arguments.args
            if len(args) != 2 or node.arguments.kwargs or len(node.inputs) != 1:
                continue
            constant = args[1] if isinstance(args[0], keras.KerasTensor) else args[0]
            if not isinstance(constant, (int, float)):
                continue
            producer = self.graph.producer.get(node.inputs[0])
            if (
                producer is not None
                and id(producer) not in self.scale_folds
                and self._scale_folds_into(producer, node)
                and producer.layer.use_bias
            ):
                folds[id(producer)] = (float(constant), node)
        return folds

    def _plan_input_scale_folds(self):
        """Finds scalar Rescalings that fold into the Conv/Dense reading them.

        The converter folds `conv(x * c)` for one scalar `c` into a single
        op with the kernel times `c`, also through zero padding and an
        identity Normalization (EfficientNet's `1 / 255` stem, measured);
        x then reaches the op at its own scale, with no MUL.

        Returns `{id(linear node): (scale, rescaling node)}`.
        """
        folds = {}
        for node in self.graph.nodes:
            layer = node.layer
            if (
                type(layer) is not keras.layers.Rescaling
                or self._is_float(node)
                or self.graph.is_shared(layer)
                or np.size(layer.scale) != 1
                or not is_constant(layer.offset, 0.0)
                or not _reads_float(node)
            ):
                continue
            reader = self.graph.sole_consumer(node.outputs[0])
            while reader is not None and not self._is_float(reader) and (
                isinstance(reader.layer, _ZERO_PADDINGS)
                or _is_identity_affine(reader)
            ):
                reader = self.graph.sole_consumer(reader.outputs[0])
            if (
                reader is not None
                and registry.policy_for(reader.layer) == registry.LINEAR
                and not isinstance(reader.layer, PrunedLayer)
                and not self._is_float(reader)
                and not self.graph.is_shared(reader.layer)
            ):
                folds[id(reader)] = (float(np.reshape(layer.scale, ())), node)
        return folds

    def _plan_aliases(self):
        """Ids of the nodes that vanish: their output is their input's tensor.

        A scalar Rescaling folded into the kernel after it, a LayerScale
        folded into the one before it, an identity Rescaling/Normalization.
        """
        folded_rescalings = {id(r) for _, r in self.input_scale_folds.values()}
        return {
            id(node)
            for node in self.graph.nodes
            if not self._is_float(node)
            and (
                id(node) in folded_rescalings
                or (
                    registry.policy_for(node.layer) == registry.CHANNEL_SCALE
                    and id(node) in self.folded_scales
                )
                or _is_identity_affine(node)
            )
        }

    def _plan_range_groups(self):
        """Groups the tensors that must share one int8 scale.

        The inputs and output of CONCATENATION, MAXIMUM and MINIMUM share
        one scale, and so do the input and output of pooling, padding and
        reshape ops; the converter propagates one scale over every tensor
        linked this way (DenseNet's blocks, from the pooled transition
        output on; Inception's max-pooled branch) and clips each to it.
        Each such tensor that has a fake-quant quantizes with the group's
        range, so the QAT model clips and rounds as the device does; a range
        of its own would cost a requantize op. An average pooling's output
        is rounded to its input's scale, so it gets a fake-quant in its
        input's group.

        Returns `{tensor key: RangeGroup}`.
        """
        parent = {}

        def root(key):
            while parent.get(key, key) != key:
                key = parent[key]
            return key

        def link(keys):
            first = root(keys[0])
            for key in keys[1:]:
                parent[root(key)] = first

        owners = []  # Nodes whose tensors need one range: a group each.
        for node in self.graph.nodes:
            if self._is_float(node):
                continue
            policy = registry.policy_for(node.layer)
            if policy == registry.SHARED_SCALE:
                link(list(node.inputs) + list(node.outputs))
                owners.append(node)
            elif id(node) in self.aliases or (
                policy == registry.PASSTHROUGH and len(node.inputs) == 1
            ):
                link(list(node.inputs) + list(node.outputs))
                if _averages(node.layer):
                    owners.append(node)
        for calls in self.graph.calls.values():
            # One layer, one output quantizer: all its calls have its range.
            policy = registry.policy_for(calls[0].layer)
            if (
                len(calls) > 1
                and not self._is_float(calls[0])
                and (policy != registry.PASSTHROUGH or _averages(calls[0].layer))
            ):
                link([self._quantized_key(call) for call in calls])
        # Unique per quantize_model call: `.keras` loading finds a group's
        # members by name, and two QAT models of one name may share a file.
        suffix = uuid.uuid4().hex[:8]
        groups = {}
        for node in owners:  # Named after the chain's last one.
            groups[root(node.outputs[0])] = RangeGroup(
                f"{self.graph.name}/{node.name}/{suffix}"
            )
        return {
            key: groups[root(key)]
            for key in set(parent) | set(parent.values())
            if root(key) in groups
        }

    def _quantized_key(self, node):
        """The key of the tensor `node`'s output fake-quant quantizes."""
        fusion = self.fusions.get(id(node))
        return (fusion.tail if fusion else node).outputs[0]

    def _scale_folds_into(self, producer, node):
        layer = producer.layer
        fusion = self.fusions.get(id(producer))
        return (
            type(layer) in _SCALE_FOLDABLE
            and not self._is_float(producer)
            and not self.graph.is_shared(layer)
            and getattr(layer, "data_format", "channels_last") == "channels_last"
            and fusion is not None
            and fusion.batch_norm is None
            and fusion.activation is None
            and registry.function_name(layer.activation) == "linear"
            and self.graph.sole_consumer(producer.outputs[0]) is node
        )

    def _copy_of(self, node):
        """A fresh layer computing what `node` computes.

        A `keras.ops` call recorded by a Functional model becomes an
        `OperationLayer` that keeps the call's constant arguments.
        """
        if isinstance(node.layer, keras.layers.Layer):
            return self._copy(node.layer)
        template, _ = argument_template(node.arguments.args, node.arguments.kwargs)
        return OperationLayer(node.layer, arguments=template, name=node.name)

    def _is_float(self, node):
        """True for a node kept in float (`skip=` or the `FLOAT` policy)."""
        return (
            node.name in self.skip
            or registry.policy_for(node.layer) == registry.FLOAT
        )

    def _quantizer_kwargs(self, key=None):
        """Constructor arguments of a layer whose output is tensor `key`."""
        kwargs = {
            "num_bits": self.scheme.activation_bits,
            "ema_decay": self.scheme.ema_decay,
        }
        if key in self.range_groups:
            kwargs["range_group"] = self.range_groups[key]
        return kwargs

    def _fake_quant(self, name, key):
        return FakeQuant(name=self._unique(name), **self._quantizer_kwargs(key))

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
                value = self._fake_quant(
                    f"{graph_input.name}_quantize", graph_input.key
                )(value)
            self.tensors[graph_input.key] = value
        for node in self.graph.nodes:
            self._build_node(node)
        outputs = [self.tensors[key] for key in self.graph.outputs]
        outputs = tree.pack_sequence_as(self.graph.outputs_struct, outputs)
        inputs = tree.pack_sequence_as(self.graph.inputs_struct, new_inputs)
        model = keras.Model(inputs, outputs, name=self.graph.name)
        for original, copy, transform in self.weight_pairs:
            weights = original.get_weights()
            copy.set_weights(weights if transform is None else transform(weights))
        return model

    def _call(self, layer, node):
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

    def _layer_for(self, key, make):
        """Returns the new layer for `key`, made once: shared layers stay shared."""
        if key not in self.new_layers:
            self.new_layers[key] = make()
        return self.new_layers[key]

    def _build_node(self, node):
        fusion = self.fusions.get(id(node))
        if fusion is not None and node is not fusion.head:
            return  # Built with its head.
        if id(node) in self.folded_additions:
            return  # Folded into the bias of the op before it.
        if id(node) in self.aliases:
            self.tensors[node.outputs[0]] = self.tensors[node.inputs[0]]
            return
        if self._is_float(node):
            self._build_float(node)
            return
        policy = registry.policy_for(node.layer)
        if isinstance(policy, LayerQuantization):
            self._build_custom(node, policy)
        elif policy == registry.SCALED_ADD:
            self._build_scaled_add(node, fusion)
        elif policy == registry.AFFINE:
            layer = self._layer_for(
                id(node.layer),
                lambda: QuantizedAffine(
                    self._copy(node.layer), name=node.name,
                    **self._quantizer_kwargs(node.outputs[0]),
                ),
            )
            self._store_outputs(node, self._call(layer, node))
        elif policy == registry.LINEAR:
            self._build_linear(node, fusion)
        elif policy == registry.BATCH_NORM:
            layer = self._layer_for(
                id(node.layer),
                lambda: QuantizedBatchNormalization(
                    self._copy(node.layer),
                    activation=fusion.activation_name,
                    name=node.name,
                    **self._quantizer_kwargs(fusion.tail.outputs[0]),
                ),
            )
            self.tensors[fusion.tail.outputs[0]] = self._call(layer, node)
        elif policy == registry.ACTIVATION:
            self._build_activation(node)
        elif policy in (
            registry.OUTPUT, registry.SHARED_SCALE, registry.CHANNEL_SCALE
        ):
            activation = fusion.activation_name if fusion else "linear"
            tail = fusion.tail if fusion else node
            layer = self._layer_for(
                id(node.layer),
                lambda: QuantizeOutputWrapper(
                    self._copy_of(node),
                    activation=activation,
                    name=node.name,
                    **self._quantizer_kwargs(tail.outputs[0]),
                ),
            )
            self.tensors[tail.outputs[0]] = self._call(layer, node)
        elif _averages(node.layer):
            layer = self._layer_for(
                id(node.layer),
                lambda: QuantizeOutputWrapper(
                    self._copy_of(node),
                    average_divisor=_average_divisor(
                        node.layer, self.scheme.activation_bits
                    ),
                    name=node.name,
                    **self._quantizer_kwargs(node.outputs[0]),
                ),
            )
            self._store_outputs(node, self._call(layer, node))
        else:  # PASSTHROUGH
            layer = self._layer_for(id(node.layer), lambda: self._copy_of(node))
            self._store_outputs(node, self._call(layer, node))

    def _build_scaled_add(self, node, fusion):
        """`inputs[0] + inputs[1] * scale` as ADD, after a MUL unless folded."""
        shortcut, residual = (self.tensors[key] for key in node.inputs)
        if id(node) not in self.folded_scales:
            scale = self._layer_for(
                ("scale", id(node.layer)),
                lambda: QuantizeOutputWrapper(
                    keras.layers.Rescaling(node.layer.scale),
                    name=self._unique(f"{node.name}_scale"),
                    **self._quantizer_kwargs(),
                ),
            )
            residual = scale(residual)
        add = self._layer_for(
            id(node.layer),
            lambda: QuantizeOutputWrapper(
                keras.layers.Add(),
                activation=fusion.activation_name,
                name=node.name,
                **self._quantizer_kwargs(fusion.tail.outputs[0]),
            ),
        )
        self.tensors[fusion.tail.outputs[0]] = add([shortcut, residual])

    def _build_custom(self, node, policy):
        layer = self._layer_for(
            id(node.layer),
            lambda: QuantizedCustomLayer(
                self._copy(node.layer),
                weights=policy.weights,
                quantize_output=policy.has_output_quantizer,
                fixed_output_range=policy.fixed_output_range,
                weight_bits=self.scheme.weight_bits,
                name=node.name,
                **self._quantizer_kwargs(node.outputs[0]),
            ),
        )
        self._store_outputs(node, self._call(layer, node))

    def _store_outputs(self, node, outputs):
        for key, value in zip(node.outputs, tree.flatten(outputs)):
            self.tensors[key] = value

    def _build_linear(self, node, fusion):
        own_activation = registry.function_name(node.layer.activation)
        split = own_activation not in registry.FUSABLE_ACTIVATIONS
        activation_name = "linear" if split else fusion.activation_name
        tail = fusion.tail
        scale = self.scale_folds.get(id(node))
        transform = None if scale is None else _scaled_weights(scale)
        if id(node) in self.bias_folds:
            constant, addition = self.bias_folds[id(node)]
            transform = _shifted_bias(constant)
            add_fusion = self.fusions.get(id(addition))
            if add_fusion is not None:
                activation_name = add_fusion.activation_name
                tail = add_fusion.tail
            else:
                tail = addition
        if id(node) in self.input_scale_folds:
            input_scale, _ = self.input_scale_folds[id(node)]
            transform = _composed(_scaled_kernel(input_scale), transform)
        layer = self._layer_for(
            id(node.layer),
            lambda: QuantizedLinear(
                self._copy(node.layer, transform),
                batch_norm=None
                if fusion.batch_norm is None
                else self._copy(fusion.batch_norm.layer),
                activation=activation_name,
                per_channel=self.scheme.per_channel,
                weight_bits=self.scheme.weight_bits,
                name=node.name,
                **self._quantizer_kwargs(None if split else tail.outputs[0]),
            ),
        )
        outputs = self._call(layer, node)
        if split:
            wrapper = self._layer_for(
                ("activation", id(node.layer)),
                lambda: self._quantized_activation(
                    keras.layers.Activation(
                        own_activation, name=f"{node.name}_activation"
                    ),
                    own_activation,
                    self._unique(f"{node.name}_activation"),
                    tail.outputs[0],
                ),
            )
            outputs = wrapper(outputs)
        self.tensors[tail.outputs[0]] = outputs

    def _quantized_activation(self, layer, name, layer_name, key):
        """The quantized form of activation `layer` computing `name`.

        Swish is two int8 ops (LOGISTIC, MUL); every other activation is
        one, with an observed or (sigmoid, softmax, tanh) fixed output range.
        `key` is the output tensor's.
        """
        kwargs = self._quantizer_kwargs(key)
        if name in GATED_ACTIVATIONS:
            return QuantizedSwish(layer, name=layer_name, **kwargs)
        fixed_range = FIXED_RANGES.get(name)
        if fixed_range is not None:
            kwargs.pop("range_group", None)  # The kernel fixes the scale.
        return QuantizeOutputWrapper(
            layer, fixed_range=fixed_range, name=layer_name, **kwargs
        )

    def _build_activation(self, node):
        name = registry.activation_name(node.layer)
        if name == "linear":
            layer = self._layer_for(id(node.layer), lambda: self._copy_of(node))
        else:
            layer = self._layer_for(
                id(node.layer),
                lambda: self._quantized_activation(
                    self._copy_of(node), name, node.name, node.outputs[0]
                ),
            )
        self._store_outputs(node, self._call(layer, node))

    def _build_float(self, node):
        """A layer kept in float; its output is re-quantized where needed."""
        layer = self._layer_for(id(node.layer), lambda: self._copy_of(node))
        outputs = tree.flatten(self._call(layer, node))
        for key, value in zip(node.outputs, outputs):
            readers = self.graph.consumers.get(key, [])
            needs_int8 = key in self.graph.output_keys or any(
                not self._is_float(reader) for reader in readers
            )
            if needs_int8 and "float" in str(value.dtype):
                value = self._layer_for(
                    ("float_exit", key),
                    lambda: self._fake_quant(f"{node.name}_quantize", key),
                )(value)
            self.tensors[key] = value
