"""Keras callbacks that drive quantization-aware training.

- `QuantizationScheduler`: when fake-quant starts, BatchNorm statistics
  freeze and activation ranges freeze, as graph variables (no retrace).
- `QuantizationMonitor`: per-epoch clipping, weight SQNR and phase in logs.
- `TFLiteExport`: writes (and scores) the int8 .tflite at the end of
  training or at the best epoch.
- `PruningScheduler`: sets the pruning schedule of a `prune_model` model in
  its graph variables and logs its sparsity each epoch.

Usage: `model.fit(x, y, epochs=..., callbacks=[QuantizationScheduler(...),
QuantizationMonitor(x_val), TFLiteExport("model.tflite")])`.
"""

from qat_plugin.callbacks.monitor import QuantizationMonitor
from qat_plugin.callbacks.pruning import PruningScheduler, model_sparsity
from qat_plugin.callbacks.scheduler import QuantizationScheduler, current_phase
from qat_plugin.callbacks.tflite_export import TFLiteExport

__all__ = [
    "PruningScheduler",
    "QuantizationMonitor",
    "QuantizationScheduler",
    "TFLiteExport",
    "current_phase",
    "model_sparsity",
]
