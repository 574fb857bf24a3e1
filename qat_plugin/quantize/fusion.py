"""Finds the layer chains that become one int8 TFLite op.

The TFLite converter folds a BatchNormalization into the convolution or
fully-connected op before it, and fuses RELU/RELU6 into CONV_2D,
DEPTHWISE_CONV_2D, FULLY_CONNECTED, ADD, SUB and MUL. QAT must see the same
chain as one op: the folded kernel is the one quantized, and there is no
fake-quant between an op and its fused activation.
"""

import dataclasses

from qat_plugin import registry
from qat_plugin.config.constants import FUSED_ACTIVATIONS


@dataclasses.dataclass(eq=False)
class Fusion:
    """A chain head -> [batch_norm] -> [activation] that becomes one op."""

    head: object  # OpNode
    batch_norm: object = None  # OpNode of the folded BatchNormalization
    activation: object = None  # OpNode of the fused activation layer
    activation_name: str = "linear"

    @property
    def tail(self):
        return self.activation or self.batch_norm or self.head

    @property
    def absorbed(self):
        return [n for n in (self.batch_norm, self.activation) if n is not None]


def _accepts_activation(node):
    spec = registry.spec_for(node.layer)
    return spec is not None and spec.fuses_activation


def _folds_into(graph, head, bn_node):
    """True when `bn_node` normalizes `head`'s output channels alone."""
    layer, bn = head.layer, bn_node.layer
    if graph.is_shared(layer) or graph.is_shared(bn):
        return False
    if registry.function_name(getattr(layer, "activation", None)) != "linear":
        return False
    rank = len(bn_node.arguments.keras_tensors[0].shape)
    axes = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    if len(axes) != 1:
        return False
    channels_first = getattr(layer, "data_format", None) == "channels_first"
    channel_axis = 1 if channels_first and rank > 2 else rank - 1
    return axes[0] % rank == channel_axis


def find_fusions(graph, skip):
    """Returns {id(node): Fusion} for every head node and absorbed node.

    Args:
        graph: the `LayerGraph`.
        skip: names of layers kept in float; they are never fused.
    """
    fusions = {}
    for node in graph.nodes:
        if id(node) in fusions or node.name in skip:
            continue
        if not _accepts_activation(node):
            continue
        fusion = Fusion(head=node)
        if registry.policy_for(node.layer) == registry.LINEAR:
            fusion.activation_name = registry.function_name(node.layer.activation)
            following = graph.sole_consumer(node.outputs[0])
            if (
                fusion.activation_name == "linear"
                and following is not None
                and following.name not in skip
                and registry.policy_for(following.layer) == registry.BATCH_NORM
                and _folds_into(graph, node, following)
            ):
                fusion.batch_norm = following
        if fusion.activation_name == "linear":
            following = graph.sole_consumer(fusion.tail.outputs[0])
            if (
                following is not None
                and following.name not in skip
                and registry.policy_for(following.layer) == registry.ACTIVATION
                and registry.activation_name(following.layer)
                in FUSED_ACTIVATIONS
            ):
                fusion.activation = following
                fusion.activation_name = registry.activation_name(following.layer)
        for member in [fusion.head] + fusion.absorbed:
            fusions[id(member)] = fusion
    _unfuse_disagreeing_calls(graph, fusions)
    return fusions


def _unfuse_disagreeing_calls(graph, fusions):
    """Keeps a shared layer's activation out of its fusions unless every call agrees.

    A shared layer becomes one quantized layer with one fused activation,
    applied at every call: fusing a ReLU that follows only some calls would
    clip the others. Their activations then stay ops of their own.
    """
    for calls in graph.calls.values():
        chains = [fusions.get(id(call)) for call in calls]
        if len(calls) < 2 or any(chain is None or chain.head is not call
                                 for chain, call in zip(chains, calls)):
            continue
        if len({chain.activation_name for chain in chains}) == 1:
            continue
        own = registry.function_name(getattr(calls[0].layer, "activation", None))
        for chain in chains:
            if chain.activation is not None:
                del fusions[id(chain.activation)]
                chain.activation = None
                chain.activation_name = own if own in FUSED_ACTIVATIONS else "linear"
