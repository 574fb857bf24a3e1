"""Recipe data: quantization, schedule, pruning and export sections.

Every section is a frozen dataclass; `RecipeConfig` holds one of each. The
schema below checks every field's type and allowed values (`validate`)
before the dataclasses are built, and the dataclasses check what spans
fields in `__post_init__`, so a recipe that exists is valid. Reading files
lives in `recipe_files`; the workflow methods (`prune`, `quantize`, ...) in
`qat_plugin.recipes.Recipe`.
"""

import dataclasses
import difflib
import math
import reprlib

from qat_plugin.config.constants import (
    NEVER,
    NEVER_KEYWORD,
    TARGETS,
    UNITS,
    UNSTRUCTURED,
    check_freeze_points,
)
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

    Examples:
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
        return replaced(self, sections)


EXPORT_TARGETS = TARGETS + ("any",)
PRUNING_SCHEDULES = ("constant", "polynomial")


def _number(minimum=0.0, maximum=NEVER, closed_max=True, integer=False):
    # Numbers are finite (`inf` and `nan` are refused where they are read)
    # and at most NEVER, the step at which a schedule switch never happens.
    kinds = int if integer else (int, float)
    if closed_max:
        check, text = (lambda v: minimum <= v <= maximum), f"in [{minimum}, {maximum}]"
    else:
        check, text = (lambda v: minimum <= v < maximum), f"in [{minimum}, {maximum})"
    return kinds, check, ("an integer " if integer else "a finite number ") + text


def _one_of(values):
    return str, lambda v: v in values, "one of " + ", ".join(f'"{v}"' for v in values)


def _point():
    # A schedule point: a number of steps/epochs, or "never".
    return (
        (int, float, str),
        lambda v: v == NEVER_KEYWORD if isinstance(v, str) else 0 <= v <= NEVER,
        f'a finite number in [0, {NEVER}] or "{NEVER_KEYWORD}"',
    )


# N:M groups longer than this hold no kernel's channels.
_MAX_GROUP = 1 << 16


def _structure_ok(value):
    if value == UNSTRUCTURED:
        return True
    n, _, m = value.partition(":")
    return n.isdecimal() and m.isdecimal() and 0 < int(n) < int(m) <= _MAX_GROUP


_SECTIONS = {
    "quantization": (QuantizationScheme, {
        "weight_bits": (int, lambda v: v == 8, "8"),
        "per_channel": (bool, lambda v: True, "true or false"),
        "activation_bits": (int, lambda v: v in (8, 16), "8 or 16"),
        "ema_decay": _number(0.0, 1.0, closed_max=False),
    }),
    "schedule": (Schedule, {
        "unit": _one_of(UNITS),
        "quantize_start": _number(),
        "bn_freeze": _point(),
        "range_freeze": _point(),
    }),
    "pruning": (Pruning, {
        "sparsity": _number(0.0, 1.0, closed_max=False),
        "structure": (str, _structure_ok, f'"unstructured" or "N:M" with 0 < N < M <= {_MAX_GROUP}'),
        "schedule": _one_of(PRUNING_SCHEDULES),
        "unit": _one_of(UNITS),
        "begin": _number(),
        "end": _number(),
        "frequency": _number(1, integer=True),
        "power": _number(),
        "epochs": _number(0, integer=True),
    }),
    "export": (ExportSettings, {
        "target": _one_of(EXPORT_TARGETS),
        "sparse_weights": (bool, lambda v: True, "true or false"),
        "allow_select_tf_ops": (bool, lambda v: True, "true or false"),
    }),
}
TOP_LEVEL = {"description": (str, lambda v: True, "a string"),
              "extends": (str, lambda v: True, "a recipe name")}
TOP_LEVEL.update({name: None for name in _SECTIONS})


def replaced(recipe, sections):
    """`recipe` with `sections` (as `RecipeConfig.replace` takes them) laid over it."""
    sections = dict(sections)
    quantization = {k: sections.pop(k) for k in list(sections)
            if k in _SECTIONS["quantization"][1]}
    if quantization:
        sections["quantization"] = {**sections.get("quantization", {}), **quantization}
    if "extends" in sections:
        raise RecipeError(
        "replace() overrides fields of this recipe; to start from another "
        "one, call replace() on recipes.get(name)."
        )
    validate(sections, TOP_LEVEL, None, recipe.source)
    return merged(recipe, sections, recipe.source, name=recipe.name)


def merged(base, data, source, name):
    """`base` with the (validated) sections of `data` laid over it."""
    fields = {"name": name, "source": source,
              "description": data.get("description", base.description)}
    try:
        for section in _SECTIONS:
            values = dict(data.get(section, {}))
            for key in ("bn_freeze", "range_freeze"):
                if values.get(key) == NEVER_KEYWORD:
                    values[key] = None
            fields[section] = dataclasses.replace(getattr(base, section), **values)
        return type(base)(**fields)
    except RecipeError as error:  # A cross-field check of the dataclasses.
        raise RecipeError(f"Recipe {source or '<in memory>'}: {error}") from None


def validate(values, fields, section, source):
    where = f"[{section}]" if section else "top level"
    where_file = source or "<in memory>"
    if not isinstance(values, dict):
        raise RecipeError(f"Recipe {where_file}: [{section}] must be a table.")
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise RecipeError(
                f"Recipe {where_file}: unknown key {_shown(key)} at {where}. "
                f"Allowed keys: {', '.join(sorted(fields))}.{hint}"
            )
        spec = fields[key]
        if spec is None:  # A section.
            validate(value, _SECTIONS[key][1], key, source)
            continue
        kind, check, allowed = spec
        wrong_type = (isinstance(value, bool) and kind is not bool) or not isinstance(
            value, kind
        )
        not_finite = isinstance(value, float) and not math.isfinite(value)
        if wrong_type or not_finite or not check(value):
            raise RecipeError(
                f"Recipe {where_file}: {where} '{key}' must be {allowed}, "
                f"got {_shown(value)}."
            )


def _shown(value):
    """`repr(value)`, cut short: a hostile file's value can be megabytes."""
    return _SHORT_REPR.repr(value)


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 60
