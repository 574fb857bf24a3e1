"""Builder functions for the transformer layer kinds.

Each is a `(builder, node, spec, fusion)` function as in
`quantize.builders`; `TRANSFORMER_BUILDERS` maps their policies to them and
joins `quantize.builders.BUILDERS`.
"""

from qat_plugin import registry
from qat_plugin.errors import UnsupportedLayerError
from qat_plugin.layers import (
    QuantizedDotProductAttention,
    QuantizedEmbedding,
    QuantizedLayerNormalization,
    QuantizedPatchEmbedding,
    QuantizedTokenAndPositionEmbedding,
)
from qat_plugin.layers.patch_embedding import patch_embedding_like


def build_embedding(builder, node, spec, fusion):
    """An embedding table: GATHER of an int8 table (and its reverse FULLY_CONNECTED)."""
    if hasattr(node.layer, "token_embedding"):
        layer = builder.wrapped(node, QuantizedTokenAndPositionEmbedding)
    else:
        calls = builder.graph.calls[id(node.layer)]
        reverse = any(call.arguments.kwargs.get("reverse") for call in calls)
        layer = builder.layer_for(id(node.layer), lambda: QuantizedEmbedding(
            builder.copy(node.layer), name=node.name, reverse=reverse,
            **builder.quantizer_kwargs(node.outputs[0])))
    builder.store_outputs(node, builder.call(layer, node))


def build_layer_norm(builder, node, spec, fusion):
    """A LayerNormalization as a chain of int8 ops, each fake-quantized."""
    layer = builder.wrapped(node, QuantizedLayerNormalization)
    builder.store_outputs(node, builder.call(layer, node))


def build_attention(builder, node, spec, fusion):
    """`ops.dot_product_attention` as int8 BATCH_MATMUL, MUL, SOFTMAX, BATCH_MATMUL."""
    values = {id(t): builder.tensors[key]
              for t, key in zip(node.arguments.keras_tensors, node.inputs)}
    args, kwargs = node.arguments.fill_in(values)
    names = ("query", "key", "value", "bias", "mask", "scale", "is_causal")
    call = dict(zip(names, args), **kwargs)
    if call.get("bias") is not None:
        raise UnsupportedLayerError(
            f"'{node.name}': dot_product_attention with a bias has no int8 "
            f"lowering here; keep it float with quantize_model(..., "
            f"skip=['{node.name}'])."
        )
    layer = builder.layer_for(id(node), lambda: QuantizedDotProductAttention(
        scale=call.get("scale"), is_causal=call.get("is_causal", False),
        name=builder.unique(node.name), **builder.quantizer_kwargs(node.outputs[0])))
    builder.store_outputs(node, layer(call["query"], call["key"], call["value"],
                                      call.get("mask")))


def build_patch_embedding(builder, node, spec, fusion):
    """A ViT/DeiT patch embedding: int8 CONV_2D, CONCATENATION with its tokens, ADD."""

    def make():
        # keras-hub's layer does not rebuild from its config: a
        # PatchEmbedding holds the same weights, copied from it.
        float_layer, weights = patch_embedding_like(node.layer)
        builder.weight_pairs.append((node.layer, float_layer, lambda _: weights()))
        return QuantizedPatchEmbedding(
            float_layer, per_channel=builder.scheme.per_channel,
            weight_bits=builder.scheme.weight_bits, name=node.name,
            **builder.quantizer_kwargs(node.outputs[0]),
        )

    layer = builder.layer_for(id(node.layer), make)
    builder.store_outputs(node, builder.call(layer, node))


TRANSFORMER_BUILDERS = {
    registry.ATTENTION: build_attention,
    registry.EMBEDDING: build_embedding,
    registry.LAYER_NORM: build_layer_norm,
    registry.PATCH_EMBEDDING: build_patch_embedding,
}
