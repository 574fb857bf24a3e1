"""The planning passes of `quantize_model`, run once into a frozen `Plan`.

Before any layer is built, each pass looks at the whole flattened graph and
decides one thing the converter will do to it: which chains fuse into one
op, which constant scales and shifts fold into a Conv/Dense, which nodes
vanish, and which tensors must share one int8 scale. Building then only
reads the plan.
"""

import dataclasses
import math
import uuid

import keras
import numpy as np
from keras.src.ops import numpy as numpy_ops

from qat_plugin import registry
from qat_plugin.errors import UnsupportedLayerError
from qat_plugin.layers.affine import is_constant
from qat_plugin.quantize.fusion import find_fusions
from qat_plugin.quantize.graph import is_masked_softmax
from qat_plugin.range_groups import RangeGroup


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the converter will fold, fuse and share, decided before building.

    Attributes:
        graph: the `LayerGraph`.
        skip: names of the layers kept in float by `skip=`.
        fusions: `{id(node): Fusion}` for every node of a fused chain.
        scale_folds: `{id(linear node): scale}`: a constant scale after the
            node folds into its kernel and bias.
        folded_scales: ids of the scaling nodes folded that way.
        bias_folds: `{id(linear node): (constant, addition node)}`: `x + c`
            after the node folds into its bias.
        folded_additions: ids of the addition nodes folded that way.
        input_scale_folds: `{id(linear node): (scale, rescaling node)}`: a
            scalar Rescaling before the node folds into its kernel.
        aliases: ids of the nodes that vanish (output = input tensor).
        range_groups: `{tensor key: RangeGroup}` for tensors sharing a scale.
    """

    graph: object
    skip: frozenset
    fusions: dict
    scale_folds: dict
    folded_scales: frozenset
    bias_folds: dict
    folded_additions: frozenset
    input_scale_folds: dict
    aliases: frozenset
    range_groups: dict

    def is_float(self, node):
        """True for a node kept in float (`skip=` or the `FLOAT` policy)."""
        return is_float(node, self.skip)

    def quantized_key(self, node):
        """The key of the tensor `node`'s output fake-quant quantizes."""
        return quantized_key(node, self.fusions)


def make_plan(graph, skip=frozenset()):
    """Runs every planning pass over `graph` and returns the `Plan`."""
    skip = frozenset(skip)
    fusions = find_fusions(graph, skip)
    scale_folds, folded_scales = plan_scale_folds(graph, skip, fusions)
    bias_folds = plan_bias_folds(graph, skip, fusions, scale_folds)
    input_scale_folds = plan_input_scale_folds(graph, skip)
    aliases = plan_aliases(graph, skip, folded_scales, input_scale_folds)
    return Plan(
        graph=graph,
        skip=skip,
        fusions=fusions,
        scale_folds=scale_folds,
        folded_scales=frozenset(folded_scales),
        bias_folds=bias_folds,
        folded_additions=frozenset(id(add) for _, add in bias_folds.values()),
        input_scale_folds=input_scale_folds,
        aliases=frozenset(aliases),
        range_groups=plan_range_groups(graph, skip, fusions, aliases),
    )


def is_float(node, skip):
    """True for a node kept in float (`skip=` or the `FLOAT` policy)."""
    return node.name in skip or registry.policy_for(node.layer) == registry.FLOAT


def quantized_key(node, fusions):
    """The key of the tensor `node`'s output fake-quant quantizes."""
    fusion = fusions.get(id(node))
    return (fusion.tail if fusion else node).outputs[0]


def reads_float(node):
    """True when `node`'s first input is a float tensor (a Rescaling of an
    integer input also casts it: it cannot simply vanish)."""
    return "float" in str(node.arguments.keras_tensors[0].dtype)


def is_identity_affine(node):
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
    return reads_float(node) and all(
        is_constant(keras.ops.convert_to_numpy(value), constant)
        for value, constant in pairs
    )


def averages(layer):
    """True for a same-scale op whose outputs fall between its input's steps.

    AVERAGE_POOL_2D and RESIZE_BILINEAR keep their input's scale but round
    their outputs to it: QAT needs a fake-quant there, with the input's range.
    """
    spec = registry.spec_for(layer)
    return spec is not None and spec.averages_for(layer)


def average_divisor(layer, num_bits):
    """A multiple of every count an average pooling divides by, or None.

    "valid" pooling always averages `prod(pool_size)` values; "same"
    pooling fewer at the borders: per axis any of 1..pool_size, so the
    product of each axis's least common multiple. Snapping to `1 / divisor`
    steps is exact in float32 while `divisor * 2^(num_bits - 1)` stays
    below 2^22; past that the interior count is used.
    """
    pool_size = getattr(layer, "pool_size", None)
    if pool_size is None or not averages(layer):
        return None
    count = math.prod(pool_size)
    if layer.padding == "valid":
        return count
    multiple = math.prod(math.lcm(*range(1, p + 1)) for p in pool_size)
    return multiple if multiple <= 1 << (23 - num_bits) else count


def _scale_folds_into(graph, skip, fusions, producer, node):
    """True when a constant scale at `node` folds into `producer`'s kernel."""
    layer = producer.layer
    spec = registry.spec_for(layer)
    fusion = fusions.get(id(producer))
    return (
        spec is not None
        and spec.folds_output_scale
        and not is_float(producer, skip)
        and not graph.is_shared(layer)
        and getattr(layer, "data_format", "channels_last") == "channels_last"
        and fusion is not None
        and fusion.batch_norm is None
        and fusion.activation is None
        and registry.function_name(layer.activation) == "linear"
        and graph.sole_consumer(producer.outputs[0]) is node
    )


def plan_scale_folds(graph, skip, fusions):
    """Finds the constant scales that fold into the Conv/Dense before them.

    The converter folds a multiplication by a constant into the weights
    of the convolution or fully-connected op producing its input
    (Inception-ResNet's residual scale, ConvNeXt's LayerScale); QAT must
    quantize the folded weights to export the same single op.

    Returns `({id(linear node): scale}, {id(scaling node)})`.
    """
    folds, folded = {}, set()
    for node in graph.nodes:
        policy = registry.policy_for(node.layer)
        if policy not in (registry.SCALED_ADD, registry.CHANNEL_SCALE):
            continue
        if is_float(node, skip) or graph.is_shared(node.layer):
            continue
        if policy == registry.SCALED_ADD:
            if len(node.inputs) != 2 or node.inputs[0] == node.inputs[1]:
                continue
            scaled_key = node.inputs[1]
            scale = float(node.layer.scale)
        else:
            scaled_key = node.inputs[0]
            scale = keras.ops.convert_to_numpy(node.layer.gamma)
        producer = graph.producer.get(scaled_key)
        if producer is not None and _scale_folds_into(graph, skip, fusions, producer, node):
            folds[id(producer)] = scale
            folded.add(id(node))
    return folds, folded


def plan_bias_folds(graph, skip, fusions, scale_folds):
    """Finds `x + constant` ops that fold into the Conv/Dense bias before.

    The converter folds the addition of a constant into the bias of the
    op producing `x` (MobileNetV3's hard sigmoid, `relu6(conv + 3)`), and
    a ReLU/ReLU6 after the addition then fuses into that op.

    Returns `{id(linear node): (constant, addition node)}`.
    """
    folds = {}
    for node in graph.nodes:
        if type(node.layer) is not numpy_ops.Add or is_float(node, skip):
            continue
        args = node.arguments.args
        if len(args) != 2 or node.arguments.kwargs or len(node.inputs) != 1:
            continue
        constant = args[1] if isinstance(args[0], keras.KerasTensor) else args[0]
        if not isinstance(constant, (int, float)):
            continue
        producer = graph.producer.get(node.inputs[0])
        if (
            producer is not None
            and id(producer) not in scale_folds
            and _scale_folds_into(graph, skip, fusions, producer, node)
            and producer.layer.use_bias
        ):
            folds[id(producer)] = (float(constant), node)
    return folds


def plan_input_scale_folds(graph, skip):
    """Finds scalar Rescalings that fold into the Conv/Dense reading them.

    The converter folds `conv(x * c)` for one scalar `c` into a single
    op with the kernel times `c`, also through zero padding and an
    identity Normalization (EfficientNet's `1 / 255` stem, measured);
    x then reaches the op at its own scale, with no MUL.

    Returns `{id(linear node): (scale, rescaling node)}`.
    """
    folds = {}
    for node in graph.nodes:
        layer = node.layer
        if (
            type(layer) is not keras.layers.Rescaling
            or is_float(node, skip)
            or graph.is_shared(layer)
            or np.size(layer.scale) != 1
            or not is_constant(layer.offset, 0.0)
            or not reads_float(node)
        ):
            continue
        reader = graph.sole_consumer(node.outputs[0])
        while reader is not None and not is_float(reader, skip) and (
            getattr(registry.spec_for(reader.layer), "pads_with_zeros", False)
            or is_identity_affine(reader)
        ):
            reader = graph.sole_consumer(reader.outputs[0])
        spec = None if reader is None else registry.spec_for(reader.layer)
        if (
            spec is not None
            and spec.folds_input_scale
            and not is_float(reader, skip)
            and not graph.is_shared(reader.layer)
        ):
            folds[id(reader)] = (float(np.reshape(layer.scale, ())), node)
    return folds


def plan_aliases(graph, skip, folded_scales, input_scale_folds):
    """Ids of the nodes that vanish: their output is their input's tensor.

    A scalar Rescaling folded into the kernel after it, a LayerScale
    folded into the one before it, an identity Rescaling/Normalization.
    """
    folded_rescalings = {id(r) for _, r in input_scale_folds.values()}
    return {
        id(node)
        for node in graph.nodes
        if not is_float(node, skip)
        and (
            id(node) in folded_rescalings
            or (
                registry.policy_for(node.layer) == registry.CHANNEL_SCALE
                and id(node) in folded_scales
            )
            or is_identity_affine(node)
        )
    }


def plan_range_groups(graph, skip, fusions, aliases):
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

    owners = []  # (name, key) of the tensors that need one range: a group each.
    for node in graph.nodes:
        if is_float(node, skip):
            continue
        policy = registry.policy_for(node.layer)
        if policy == registry.SHARED_SCALE:
            link(list(node.inputs) + list(node.outputs))
            owners.append((node.name, node.outputs[0]))
        elif id(node) in aliases or (
            policy == registry.PASSTHROUGH and len(node.inputs) == 1
        ):
            link(list(node.inputs) + list(node.outputs))
            if averages(node.layer):
                owners.append((node.name, node.outputs[0]))
        elif is_masked_softmax(node):
            # Its SELECT_V2 keeps the input's scale, which it reads.
            parent.setdefault(node.inputs[0], node.inputs[0])
            owners.append((node.name, node.inputs[0]))
    for calls in graph.calls.values():
        # One layer, one output quantizer: all its calls have its range.
        policy = registry.policy_for(calls[0].layer)
        if (
            len(calls) > 1
            and not is_float(calls[0], skip)
            and (policy != registry.PASSTHROUGH or averages(calls[0].layer))
        ):
            link([quantized_key(call, fusions) for call in calls])
    # Unique per quantize_model call: `.keras` loading finds a group's
    # members by name, and two QAT models of one name may share a file.
    suffix = uuid.uuid4().hex[:8]
    groups = {}
    for name, key in owners:  # Named after the chain's last one.
        groups[root(key)] = RangeGroup(f"{graph.name}/{name}/{suffix}")
    return {
        key: groups[root(key)]
        for key in set(parent) | set(parent.values())
        if root(key) in groups
    }


def check_activation_bits(plan, activation_bits):
    """Refuses 16-bit activations for a Concatenate, before any training.

    Its inputs share one 16-bit scale (`plan_range_groups`), yet the
    TensorFlow 2.21 converter cannot lower a 16-bit fake-quant into
    CONCATENATION ("'tfl.concatenation' op operand #0 must be ... QI8 ...,
    but got ... i16"), even with the layer kept in float; MAXIMUM and
    MINIMUM convert. The converter's own int16x8 PTQ does convert it.
    """
    if activation_bits != 16:
        return
    for node in plan.graph.nodes:
        if not plan.is_float(node) and isinstance(
            node.layer, (keras.layers.Concatenate, numpy_ops.Concatenate)
        ):
            raise UnsupportedLayerError(
                f"Layer '{node.name}' concatenates 16-bit activations, which the "
                "TFLite converter cannot export from a QAT model (its "
                "CONCATENATION takes int8 fake-quant inputs only). Use 8-bit "
                "activations (recipe 'int8' or 'int8-mcu'), or export the float "
                "model with "
                "export_tflite(model, mode='int16x8', representative_data=...), "
                "whose calibration converts it."
            )
