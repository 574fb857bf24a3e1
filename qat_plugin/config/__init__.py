"""Recipe data and shared constants: the bottom of the package.

Nothing here imports the engine; every other part of qat_plugin may import
from here.
"""

from qat_plugin.config.recipe import (
    ExportSettings,
    Pruning,
    QuantizationScheme,
    RecipeConfig,
    Schedule,
)
from qat_plugin.config.recipe_files import resolve

__all__ = [
    "ExportSettings",
    "Pruning",
    "QuantizationScheme",
    "RecipeConfig",
    "Schedule",
    "resolve",
]
