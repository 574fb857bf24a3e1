"""QAT against PTQ in the interpreter: comparison, layer-wise error, parity."""

from qat_plugin.analysis.compare import compare
from qat_plugin.analysis.layerwise import LayerwiseReport, layerwise_error
from qat_plugin.analysis.parity import (
    LocalParity,
    Parity,
    measure_local_parity,
    measure_parity,
)
from qat_plugin.analysis.report import CandidateResult, ComparisonReport

__all__ = [
    "CandidateResult",
    "ComparisonReport",
    "LayerwiseReport",
    "LocalParity",
    "Parity",
    "compare",
    "layerwise_error",
    "measure_local_parity",
    "measure_parity",
]
