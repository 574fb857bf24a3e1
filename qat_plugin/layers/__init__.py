"""The Keras layers a quantized model is built from."""

from qat_plugin.layers.activation import QuantizedHardSigmoid, QuantizedSwish
from qat_plugin.layers.affine import QuantizedAffine
from qat_plugin.layers.attention import QuantizedDotProductAttention, QuantizedMaskedSoftmax
from qat_plugin.layers.base import QuantizedLayer
from qat_plugin.layers.batch_norm import QuantizedBatchNormalization
from qat_plugin.layers.custom import QuantizedCustomLayer
from qat_plugin.layers.embedding import QuantizedEmbedding, QuantizedTokenAndPositionEmbedding
from qat_plugin.layers.fake_quant import FakeQuant
from qat_plugin.layers.linear import QuantizedLinear
from qat_plugin.layers.masking import QuantizedMasking
from qat_plugin.layers.normalization import QuantizedLayerNormalization
from qat_plugin.layers.operation import OperationLayer
from qat_plugin.layers.output_wrapper import QuantizeOutputWrapper
from qat_plugin.layers.patch_embedding import PatchEmbedding, QuantizedPatchEmbedding
from qat_plugin.layers.pruned import PrunedLayer
from qat_plugin.layers.recurrent import QuantizedRecurrent

__all__ = [
    "FakeQuant",
    "OperationLayer",
    "PatchEmbedding",
    "PrunedLayer",
    "QuantizedAffine",
    "QuantizedBatchNormalization",
    "QuantizedCustomLayer",
    "QuantizedDotProductAttention",
    "QuantizedEmbedding",
    "QuantizedHardSigmoid",
    "QuantizedTokenAndPositionEmbedding",
    "QuantizedSwish",
    "QuantizedLayer",
    "QuantizedLayerNormalization",
    "QuantizedLinear",
    "QuantizedMasking",
    "QuantizedMaskedSoftmax",
    "QuantizedPatchEmbedding",
    "QuantizedRecurrent",
    "QuantizeOutputWrapper",
]
