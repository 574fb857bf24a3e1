"""qat_plugin: quantization-aware training for Keras 3, exported to int8 TFLite.

The public API:

- `quantize_model(model, recipe="int8", skip=())`: a copy of a Keras 3 model
  with fake-quant where the int8 TFLite model quantizes, ready for `fit`.
- `export_tflite(model, path=None, ...)`: the .tflite bytes of a QAT model
  (fully int8) or of a float model (PTQ baselines).
- `inspect_tflite(bytes_or_path)`: ops, tensor types, quantization, and
  the ops still computing in float.
- `TFLiteModel`: runs a .tflite in the LiteRT interpreter like `predict`.
- `register_layer(cls, policy)`: declare how a custom layer quantizes.
"""

from qat_plugin.export import ExportError, export_tflite, is_quantized
from qat_plugin.graph import UnsupportedModelError
from qat_plugin.inspect import TFLiteReport, inspect_tflite
from qat_plugin.interpreter import TFLiteModel
from qat_plugin.layers import (
    FakeQuant,
    QuantizedBatchNormalization,
    QuantizedLayer,
    QuantizedLinear,
    QuantizeOutputWrapper,
)
from qat_plugin.registry import register_layer
from qat_plugin.transform import UnsupportedLayerError, quantize_model

__version__ = "0.1.0"

__all__ = [
    "ExportError",
    "FakeQuant",
    "QuantizeOutputWrapper",
    "QuantizedBatchNormalization",
    "QuantizedLayer",
    "QuantizedLinear",
    "TFLiteModel",
    "TFLiteReport",
    "UnsupportedLayerError",
    "UnsupportedModelError",
    "export_tflite",
    "inspect_tflite",
    "is_quantized",
    "quantize_model",
    "register_layer",
]
