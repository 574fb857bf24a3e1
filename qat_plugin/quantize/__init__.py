"""Quantize a Keras model for QAT: graph, fusion, planning, building, calibration."""

from qat_plugin.quantize.calibration import calibrate
from qat_plugin.quantize.qat_model import QATModel
from qat_plugin.quantize.transform import quantize_model

__all__ = ["QATModel", "calibrate", "quantize_model"]
