"""The Keras layers a quantized model is built from."""

from qat_plugin.layers.base import QuantizedLayer
from qat_plugin.layers.batch_norm import QuantizedBatchNormalization
from qat_plugin.layers.fake_quant import FakeQuant
from qat_plugin.layers.linear import QuantizedLinear
from qat_plugin.layers.output_wrapper import QuantizeOutputWrapper

__all__ = [
    "FakeQuant",
    "QuantizedBatchNormalization",
    "QuantizedLayer",
    "QuantizedLinear",
    "QuantizeOutputWrapper",
]
