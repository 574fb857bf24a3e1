"""Builder functions for the transformer layer kinds.

Each is a `(builder, node, spec, fusion)` function as in
`quantize.builders`; `TRANSFORMER_BUILDERS` maps their policies to them and
joins `quantize.builders.BUILDERS`.
"""

from qat_plugin import registry
from qat_plugin.layers import (
    QuantizedEmbedding,
    QuantizedLayerNormalization,
    QuantizedTokenAndPositionEmbedding,
)


def build_embedding(builder, node, spec, fusion):
    """An embedding table: GATHER of an int8 table (and its reverse FULLY_CONNECTED)."""
    composite = hasattr(node.layer, "token_embedding")
    cls = QuantizedTokenAndPositionEmbedding if composite else QuantizedEmbedding
    layer = builder.wrapped(node, cls)
    builder.store_outputs(node, builder.call(layer, node))


def build_layer_norm(builder, node, spec, fusion):
    """A LayerNormalization as a chain of int8 ops, each fake-quantized."""
    layer = builder.wrapped(node, QuantizedLayerNormalization)
    builder.store_outputs(node, builder.call(layer, node))


TRANSFORMER_BUILDERS = {
    registry.EMBEDDING: build_embedding,
    registry.LAYER_NORM: build_layer_norm,
}
