"""Magnitude and N:M pruning kept through QAT into the int8 export."""

from qat_plugin.pruning.prune import (
    prune_model,
    pruned_layers,
    strip_pruning,
)

__all__ = ["prune_model", "pruned_layers", "strip_pruning"]
