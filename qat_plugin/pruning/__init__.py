"""Magnitude and N:M pruning kept through QAT into the int8 export."""

from qat_plugin.pruning.prune import (
    n_of_m_misfits,
    prune_model,
    pruned_layers,
    strip_pruning,
)

__all__ = ["n_of_m_misfits", "prune_model", "pruned_layers", "strip_pruning"]
