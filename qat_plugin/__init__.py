"""qat_plugin: quantization-aware training for Keras 3, exported to int8 TFLite.

The public API:

- `quantize_model(model, recipe="int8", skip=())`: a copy of a Keras 3 model
  with fake-quant where the int8 TFLite model quantizes, ready for `fit`.
- `export_tflite(model, path=None, ...)`: the .tflite bytes of a QAT model
  (fully int8) or of a float model (PTQ baselines).
- `inspect_tflite(bytes_or_path)`: ops, tensor types, quantization, and
  the ops still computing in float.
- `TFLiteModel`: runs a .tflite in the LiteRT interpreter like `predict`.
- `compare(float_model, qat_model, eval_data=..., representative_data=...)`:
  QAT against the PTQ baselines in LiteRT (accuracy, agreement, size,
  latency) as a Markdown/JSON/PNG report; `layerwise_error(...)` shows
  which layer loses the accuracy.
- `register_layer(cls, policy)`: declare how a custom layer quantizes
  (a policy name or a `LayerQuantization`).
- `calibrate(model, data, steps)`: set activation ranges from sample data
  without training.
- `prune_model(model, sparsity, structure=..., schedule=...)`: magnitude or
  N:M (2:4) pruning with `ConstantSparsity` / `PolynomialDecay` schedules,
  kept through `quantize_model` into the int8 export; `strip_pruning`
  gives back plain layers with the zeros.
- `recipes.get(name)` / `recipes.load(path)`: a `Recipe` (quantization,
  schedule, pruning, export target) from a TOML file; `recipe.prune`,
  `recipe.quantize`, `recipe.callbacks` and `recipe.export_tflite` drive it.
- `measure_parity(qat_model, tflite, x)`: the export's outputs against the
  Keras QAT model's (error in output steps, top-1 agreement);
  `measure_local_parity` the same per op, each fed the interpreter's inputs.
- `check_target(tflite, "cpu" | "gpu" | "mcu")`: whether a .tflite meets a
  deployment target (`inspect_tflite(..., targets=...)` reports it too);
  `arena_plan` gives a microcontroller's activation memory.
"""

import warnings

from qat_plugin import callbacks, layers, recipes
from qat_plugin.analysis import (
    CandidateResult,
    ComparisonReport,
    LayerwiseReport,
    LocalParity,
    Parity,
    compare,
    layerwise_error,
    measure_local_parity,
    measure_parity,
)
from qat_plugin.errors import (
    ExportError,
    QATError,
    RecipeError,
    TensorFlowProcessError,
    UnsupportedLayerError,
    UnsupportedModelError,
)
from qat_plugin.layers.base import is_quantized
from qat_plugin.pruning import prune_model, strip_pruning
from qat_plugin.quantize import QATModel, calibrate, quantize_model
from qat_plugin.recipes import Recipe
from qat_plugin.registry import LayerQuantization, register_layer
from qat_plugin.sparsity import ConstantSparsity, PolynomialDecay
from qat_plugin.tflite import (
    ArenaPlan,
    TargetCheck,
    TFLiteModel,
    TFLiteReport,
    arena_plan,
    check_target,
    export_tflite,
    inspect_tflite,
)

__version__ = "0.2.0"

__all__ = [
    "ArenaPlan",
    "CandidateResult",
    "ComparisonReport",
    "ConstantSparsity",
    "ExportError",
    "LayerQuantization",
    "LayerwiseReport",
    "LocalParity",
    "Parity",
    "PolynomialDecay",
    "QATError",
    "QATModel",
    "Recipe",
    "RecipeError",
    "TFLiteModel",
    "TFLiteReport",
    "TargetCheck",
    "TensorFlowProcessError",
    "UnsupportedLayerError",
    "UnsupportedModelError",
    "arena_plan",
    "calibrate",
    "callbacks",
    "check_target",
    "compare",
    "export_tflite",
    "inspect_tflite",
    "is_quantized",
    "layerwise_error",
    "measure_local_parity",
    "measure_parity",
    "prune_model",
    "quantize_model",
    "recipes",
    "register_layer",
    "strip_pruning",
]

# Layer classes that 0.1 exported here; they live in `qat_plugin.layers`.
_MOVED_TO_LAYERS = (
    "FakeQuant",
    "PrunedLayer",
    "QuantizeOutputWrapper",
    "QuantizedBatchNormalization",
    "QuantizedLayer",
    "QuantizedLinear",
)


def __getattr__(name):
    if name in _MOVED_TO_LAYERS:
        warnings.warn(
            f"qat_plugin.{name} moved to qat_plugin.layers.{name}; import it "
            "from there.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(layers, name)
    raise AttributeError(f"module 'qat_plugin' has no attribute {name!r}")
