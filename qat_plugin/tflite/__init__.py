"""TFLite (LiteRT) files: conversion, inspection, deployment targets, running."""

from qat_plugin.tflite.convert import export_tflite
from qat_plugin.tflite.inspection import TFLiteReport, inspect_tflite
from qat_plugin.tflite.interpreter import TFLiteModel
from qat_plugin.tflite.targets import ArenaPlan, TargetCheck, arena_plan, check_target

__all__ = [
    "ArenaPlan",
    "TFLiteModel",
    "TFLiteReport",
    "TargetCheck",
    "arena_plan",
    "check_target",
    "export_tflite",
    "inspect_tflite",
]
