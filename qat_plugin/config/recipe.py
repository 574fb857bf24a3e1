"""Recipe data: quantization, schedule, pruning and export sections.

Every section is a frozen dataclass; `RecipeConfig` holds one of each. The
TOML reading and the field validation live in `recipe_files`; the workflow
methods (`prune`, `quantize`, ...) in `qat_plugin.recipes.Recipe`.
"""

import dataclasses

from qat_plugin.config.constants import UNSTRUCTURED, check_freeze_points
from qat_plugin.errors import RecipeError


@dataclasses.dataclass(frozen=True)
class QuantizationScheme:
    """Bit widths and granularity of the quantization."""

    weight_bits: int = 8
    per_channel: bool = True
    activation_bits: int = 8
    ema_decay: float = 0.99


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The `QuantizationScheduler` points; `None` (`"never"` in TOML) = never.

    The defaults, quantize from the first step and never freeze, need no
    scheduler at all: `is_trivial` is then True.
    """

    unit: str = "epoch"
    quantize_start: float = 0
    bn_freeze: float = None
    range_freeze: float = None

    def __post_init__(self):
        check_freeze_points(self.quantize_start, self.bn_freeze, self.range_freeze,
                            error=RecipeError, where="[schedule] ")

    @property
    def is_trivial(self):
        return (
            self.quantize_start == 0
            and self.bn_freeze is None
            and self.range_freeze is None
        )


@dataclasses.dataclass(frozen=True)
class Pruning:
    """The pruning phase before QAT; `sparsity = 0` and no structure: none.

    Masks update every `frequency` steps from `begin` to `end` (in `unit`s
    of the pruning fine-tuning), then freeze. A `"polynomial"` schedule
    raises the sparsity from 0 to `sparsity` along that span (Zhu & Gupta
    2017, exponent `power`); `"constant"` prunes to `sparsity` from `begin`.
    An N:M `structure` fixes the sparsity at N/M. `epochs` is the length of
    the pruning phase the recipe's measurement used.
    """

    sparsity: float = 0.0
    structure: str = UNSTRUCTURED
    schedule: str = "polynomial"
    unit: str = "epoch"
    begin: float = 0
    end: float = 0.5
    frequency: int = 50
    power: float = 3.0
    epochs: int = 1

    def __post_init__(self):
        if self.structure != UNSTRUCTURED and self.sparsity:
            n, m = (int(v) for v in self.structure.split(":"))
            if self.sparsity != n / m:
                raise RecipeError(
                    f"[pruning] structure = \"{self.structure}\" fixes the sparsity "
                    f"at {n / m:g}; 'sparsity' must be 0 (unset) or {n / m:g}, "
                    f"got {self.sparsity}."
                )
        if self.end < self.begin:
            raise RecipeError(
                f"[pruning] 'end' = {self.end} comes before 'begin' = "
                f"{self.begin}; allowed: end >= begin."
            )

    @property
    def enabled(self):
        return self.sparsity > 0 or self.structure != UNSTRUCTURED


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """`export_tflite` keywords: the deployment target and format options."""

    target: str = "any"
    sparse_weights: bool = False
    allow_select_tf_ops: bool = False


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    """The data of a recipe: quantization, schedule, pruning and export.

    `qat_plugin.recipes.Recipe` adds the workflow (`prune`, `quantize`,
    `callbacks`, `export_tflite`); the engine reads only these fields.

    Attributes:
        name: the recipe's name (the file name without `.toml`).
        description: what the recipe is for and what it trades.
        quantization: the `QuantizationScheme`.
        schedule: the `Schedule` of fake-quant start and freezes.
        pruning: the `Pruning` phase (`pruning.enabled` is False for none).
        export: the `ExportSettings` (target, sparse weights, Select TF ops).
        source: the file it was read from.

    Example:

    >>> from qat_plugin import recipes
    >>> recipe = recipes.get("int8").replace(quantization={"per_channel": False})
    >>> recipe.quantization.per_channel, recipe.export.target
    (False, 'cpu')
    """

    name: str
    description: str = ""
    quantization: QuantizationScheme = QuantizationScheme()
    schedule: Schedule = Schedule()
    pruning: Pruning = Pruning()
    export: ExportSettings = ExportSettings()
    source: str = ""

    def __post_init__(self):
        if self.export.target == "mcu" and self.quantization.activation_bits != 8:
            raise RecipeError(
                "[export] target = \"mcu\" runs int8 only; [quantization] "
                "'activation_bits' must be 8, got "
                f"{self.quantization.activation_bits}."
            )

    def replace(self, **sections):
        """Returns a copy with fields overridden, validated like a file.

        Pass a dict per section (`pruning={"sparsity": 0.75}`), or, as a
        shorthand, `[quantization]` fields directly (`per_channel=False`).
        """
        from qat_plugin.config.recipe_files import replaced

        return replaced(self, sections)
