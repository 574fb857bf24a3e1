"""Recipes: named, documented QAT setups read from TOML files.

A recipe packages a tested combination: the quantization scheme
(`[quantization]`), the training schedule (`[schedule]`: the
`QuantizationScheduler` points), an optional pruning phase (`[pruning]`)
and the export settings with a deployment target (`[export]`). A recipe is a
TOML file read with `tomllib`: loading one never executes code. The
built-in ones ship in this package; `names()` lists them, `get(name)` loads
one and `load(path)` reads a user's file, which may start from a built-in
one with `extends = "int8"` and override single fields. In Python,
`recipe.replace(...)` does the same.

The workflow a recipe drives:

1. `pruned = recipe.prune(model)`: for a pruning recipe, a `prune_model`
   copy; fine-tune it with `recipe.callbacks()` (a `PruningScheduler`) for
   `recipe.pruning.epochs` epochs. Other recipes return `model` unchanged.
2. `qat = recipe.quantize(pruned)`: `quantize_model(pruned, recipe)`;
   the pruned layers keep their masks (pruning-preserving QAT).
3. `qat.fit(..., callbacks=recipe.callbacks())`: the
   `QuantizationScheduler` of `[schedule]` (none when the schedule is
   "quantize from step 0, never freeze") and, for a pruned model, a
   `PruningScheduler` that keeps the masks.
4. `recipe.export_tflite(qat, path)`: `export_tflite` with the `[export]`
   settings, checked against the recipe's target.

Example:

>>> import keras, numpy as np
>>> from qat_plugin import recipes
>>> recipe = recipes.get("int8-pruned-50")
>>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8),
...                           keras.layers.ReLU(), keras.layers.Dense(2)])
>>> x, y = np.random.rand(64, 8).astype("float32"), np.zeros((64, 2), "float32")
>>> pruned = recipe.prune(model, steps_per_epoch=4)  # 64 samples, batch 16
>>> pruned.compile("adam", "mse")
>>> _ = pruned.fit(x, y, batch_size=16, epochs=recipe.pruning.epochs, verbose=0,
...                callbacks=recipe.callbacks(pruned))
>>> qat = recipe.quantize(pruned)
>>> qat.compile("adam", "mse")
>>> _ = qat.fit(x, y, batch_size=16, epochs=1, verbose=0,
...             callbacks=recipe.callbacks(qat))
>>> report = recipe.inspect(recipe.export_tflite(qat))
>>> report.is_fully_int8, round(report.weight_sparsity, 2)
(True, 0.5)
"""

import dataclasses
import difflib
import math
import os
import tomllib

_HERE = os.path.dirname(os.path.abspath(__file__))

NEVER = "never"
TARGETS = ("cpu", "gpu", "mcu", "any")
UNITS = ("step", "epoch")
PRUNING_SCHEDULES = ("constant", "polynomial")


class RecipeError(ValueError):
    """A recipe file or name is invalid."""


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
    structure: str = "unstructured"
    schedule: str = "polynomial"
    unit: str = "epoch"
    begin: float = 0
    end: float = 0.5
    frequency: int = 50
    power: float = 3.0
    epochs: int = 1

    @property
    def enabled(self):
        return self.sparsity > 0 or self.structure != "unstructured"


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """`export_tflite` keywords: the deployment target and format options."""

    target: str = "any"
    sparse_weights: bool = False
    allow_select_tf_ops: bool = False


def _number(minimum=0.0, maximum=math.inf, closed_max=True, integer=False):
    kinds = int if integer else (int, float)
    if closed_max:
        check, text = (lambda v: minimum <= v <= maximum), f"in [{minimum}, {maximum}]"
    else:
        check, text = (lambda v: minimum <= v < maximum), f"in [{minimum}, {maximum})"
    if maximum == math.inf:
        text = f">= {minimum}"
    return kinds, check, ("an integer " if integer else "a number ") + text


def _one_of(values):
    return str, lambda v: v in values, "one of " + ", ".join(f'"{v}"' for v in values)


def _point():
    # A schedule point: a number of steps/epochs, or "never".
    return (
        (int, float, str),
        lambda v: v == NEVER if isinstance(v, str) else v >= 0,
        f'a number >= 0 or "{NEVER}"',
    )


def _structure_ok(value):
    if value == "unstructured":
        return True
    n, _, m = value.partition(":")
    return n.isdigit() and m.isdigit() and 0 < int(n) < int(m)


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
        "structure": (str, _structure_ok, '"unstructured" or "N:M" with 0 < N < M'),
        "schedule": _one_of(PRUNING_SCHEDULES),
        "unit": _one_of(UNITS),
        "begin": _number(),
        "end": _number(),
        "frequency": _number(1, integer=True),
        "power": _number(),
        "epochs": _number(0, integer=True),
    }),
    "export": (ExportSettings, {
        "target": _one_of(TARGETS),
        "sparse_weights": (bool, lambda v: True, "true or false"),
        "allow_select_tf_ops": (bool, lambda v: True, "true or false"),
    }),
}
_TOP_LEVEL = {"description": (str, lambda v: True, "a string"),
              "extends": (str, lambda v: True, "a recipe name")}
_TOP_LEVEL.update({name: None for name in _SECTIONS})


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named QAT setup: quantization, schedule, pruning and export.

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

    def replace(self, **sections):
        """Returns a copy with fields overridden, validated like a file.

        Pass a dict per section (`pruning={"sparsity": 0.75}`), or, as a
        shorthand, `[quantization]` fields directly (`per_channel=False`).
        """
        quantization = {k: sections.pop(k) for k in list(sections)
                        if k in _SECTIONS["quantization"][1]}
        if quantization:
            sections["quantization"] = {**sections.get("quantization", {}), **quantization}
        if "extends" in sections:
            raise RecipeError(
                "replace() overrides fields of this recipe; to start from another "
                "one, call replace() on recipes.get(name)."
            )
        _validate(sections, _TOP_LEVEL, None, self.source)
        return _merged(self, sections, self.source, name=self.name)

    # -- the workflow ----------------------------------------------------

    def prune(self, model, *, steps_per_epoch=None, skip=None):
        """Returns `prune_model(model, ...)` per `[pruning]`, or `model` itself.

        Masks update every `frequency` steps from `begin` to `end`, then
        freeze, so the QAT that follows keeps them (pruning-preserving QAT).
        Points in epochs need `steps_per_epoch` (the pruning fine-tuning's).
        Fine-tune the result with `self.callbacks(pruned)` for
        `self.pruning.epochs` epochs. `skip` names layers to keep dense;
        by default (None) an N:M recipe skips the layers whose input
        channels are not a multiple of M (a 1-channel image stem), which
        N:M cannot prune, and prunes every other layer.
        """
        from qat_plugin.pruning import prune_model
        from qat_plugin.sparsity import ConstantSparsity, PolynomialDecay

        if not self.pruning.enabled:
            return model
        p = self.pruning
        begin, end = (self._steps(v, p.unit, steps_per_epoch, "pruning")
                      for v in (p.begin, p.end))
        if skip is None:
            skip = _n_of_m_misfits(model, p.structure)
        if p.structure != "unstructured":
            # The pattern fixes the sparsity; masks update until `end`.
            n, m = (int(v) for v in p.structure.split(":"))
            schedule = ConstantSparsity(n / m, begin_step=begin,
                                        end_step=max(end, begin), frequency=p.frequency)
            return prune_model(model, structure=p.structure, schedule=schedule, skip=skip)
        if p.schedule == "constant":
            schedule = ConstantSparsity(p.sparsity, begin_step=begin,
                                        end_step=max(end, begin), frequency=p.frequency)
        else:
            schedule = PolynomialDecay(0.0, p.sparsity, begin_step=begin,
                                       end_step=max(end, begin + 1), power=p.power,
                                       frequency=p.frequency)
        return prune_model(model, schedule=schedule, skip=skip)

    def quantize(self, model, *, skip=()):
        """Returns `quantize_model(model, recipe=self, skip=skip)`."""
        from qat_plugin.transform import quantize_model

        return quantize_model(model, self, skip=skip)

    def callbacks(self, model=None, *, steps_per_epoch=None):
        """Returns the callbacks to pass to `fit` for `model`'s phase.

        For a model with quantized layers: the `QuantizationScheduler` of
        `[schedule]` (omitted when it is trivial). For a model with pruned
        layers: a `PruningScheduler` (keeping the masks `prune` set up).
        With `model=None`, the QAT phase's callbacks.
        """
        from qat_plugin.callbacks import PruningScheduler, QuantizationScheduler
        from qat_plugin.export import is_quantized
        from qat_plugin.pruning import pruned_layers

        callbacks = []
        quantized = model is None or is_quantized(model)
        if quantized and not self.schedule.is_trivial:
            s = self.schedule
            callbacks.append(QuantizationScheduler(
                quantize_start=s.quantize_start, bn_freeze=s.bn_freeze,
                range_freeze=s.range_freeze, unit=s.unit,
                steps_per_epoch=steps_per_epoch,
            ))
        if model is not None and pruned_layers(model):
            callbacks.append(PruningScheduler())
        return callbacks

    def export_kwargs(self):
        """The `export_tflite` keywords of `[export]`."""
        return {
            "target": None if self.export.target == "any" else self.export.target,
            "sparse_weights": self.export.sparse_weights,
            "allow_select_tf_ops": self.export.allow_select_tf_ops,
        }

    def export_tflite(self, model, path=None):
        """`export_tflite(model, path, **self.export_kwargs())`."""
        from qat_plugin.export import export_tflite

        return export_tflite(model, path, **self.export_kwargs())

    def inspect(self, tflite):
        """`inspect_tflite` with the recipe's target checked."""
        from qat_plugin.inspect import inspect_tflite

        targets = () if self.export.target == "any" else (self.export.target,)
        return inspect_tflite(tflite, targets=targets)

    def _steps(self, value, unit, steps_per_epoch, section):
        if unit == "step":
            return int(value)
        if steps_per_epoch is None:
            raise RecipeError(
                f"Recipe '{self.name}': [{section}] is in epochs; pass "
                "steps_per_epoch= (the fine-tuning's steps per epoch)."
            )
        return round(value * steps_per_epoch)


def _n_of_m_misfits(model, structure):
    """Names of the layers whose kernels' input channels N:M cannot group."""
    from qat_plugin.layers.linear_ops import linear_op_for

    if structure == "unstructured":
        return []
    m = int(structure.split(":")[1])
    misfits = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        op = linear_op_for(layer)
        if op is not None and any(
            getattr(layer, name).shape[-2] % m for name in op.kernel_names
        ):
            misfits.append(layer.name)
    return misfits


def names():
    """Returns the sorted names of the built-in recipes."""
    return sorted(
        f[: -len(".toml")] for f in os.listdir(_HERE) if f.endswith(".toml")
    )


def path_of(name):
    """Returns the file of built-in recipe `name`."""
    if name not in names():
        close = difflib.get_close_matches(name, names(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise RecipeError(
            f"Unknown recipe '{name}'. Built-in recipes: {', '.join(names())}."
            f"{hint}"
        )
    return os.path.join(_HERE, f"{name}.toml")


def get(name):
    """Loads the built-in recipe `name`."""
    return load(path_of(name))


def load(path, _seen=()):
    """Reads and validates the recipe file at `path`."""
    path = os.path.abspath(path)
    if path in _seen:
        raise RecipeError(f"Recipe {path}: 'extends' forms a cycle.")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise RecipeError(f"Recipe file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"Recipe {path} is not valid TOML: {e}") from None
    _validate(data, _TOP_LEVEL, None, path)
    base = Recipe(name="")
    if "extends" in data:
        try:
            base = load(path_of(data["extends"]), _seen + (path,))
        except RecipeError as error:
            raise RecipeError(f"Recipe {path}: 'extends': {error}") from None
    name = os.path.basename(path)
    name = name[: -len(".toml")] if name.endswith(".toml") else name
    return _merged(base, data, path, name=name)


def _merged(base, data, source, name):
    """`base` with the (validated) sections of `data` laid over it."""
    fields = {"name": name, "source": source,
              "description": data.get("description", base.description)}
    for section in _SECTIONS:
        values = dict(data.get(section, {}))
        for key in ("bn_freeze", "range_freeze"):
            if values.get(key) == NEVER:
                values[key] = None
        fields[section] = dataclasses.replace(getattr(base, section), **values)
    recipe = Recipe(**fields)
    s = recipe.schedule
    for key in ("bn_freeze", "range_freeze"):
        value = getattr(s, key)
        if value is not None and value < s.quantize_start:
            raise RecipeError(
                f"Recipe {source or '<in memory>'}: [schedule] '{key}' = "
                f"{value} comes before quantize_start = {s.quantize_start}; "
                f'allowed: a point >= quantize_start or "{NEVER}".'
            )
    p = recipe.pruning
    if p.structure != "unstructured" and p.sparsity:
        n, m = (int(v) for v in p.structure.split(":"))
        if p.sparsity != n / m:
            raise RecipeError(
                f"Recipe {source or '<in memory>'}: [pruning] structure = "
                f"\"{p.structure}\" fixes the sparsity at {n / m:g}; 'sparsity' "
                f"must be 0 (unset) or {n / m:g}, got {p.sparsity}."
            )
    if p.end < p.begin:
        raise RecipeError(
            f"Recipe {source or '<in memory>'}: [pruning] 'end' = {p.end} comes "
            f"before 'begin' = {p.begin}; allowed: end >= begin."
        )
    q, e = recipe.quantization, recipe.export
    if e.target == "mcu" and q.activation_bits != 8:
        raise RecipeError(
            f"Recipe {source or '<in memory>'}: [export] target = \"mcu\" runs "
            "int8 only; [quantization] 'activation_bits' must be 8, got "
            f"{q.activation_bits}."
        )
    return recipe


def _validate(values, fields, section, source):
    where = f"[{section}]" if section else "top level"
    where_file = source or "<in memory>"
    if not isinstance(values, dict):
        raise RecipeError(f"Recipe {where_file}: [{section}] must be a table.")
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise RecipeError(
                f"Recipe {where_file}: unknown key '{key}' at {where}. "
                f"Allowed keys: {', '.join(sorted(fields))}.{hint}"
            )
        spec = fields[key]
        if spec is None:  # A section.
            _validate(value, _SECTIONS[key][1], key, source)
            continue
        kind, check, allowed = spec
        wrong_type = (isinstance(value, bool) and kind is not bool) or not isinstance(
            value, kind
        )
        if wrong_type or not check(value):
            raise RecipeError(
                f"Recipe {where_file}: {where} '{key}' must be {allowed}, "
                f"got {value!r}."
            )


def resolve(recipe):
    """Returns a `Recipe` from a name, a path or a `Recipe`."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, os.PathLike)):
        text = os.fspath(recipe)
        if text.endswith(".toml") or os.sep in text:
            return load(text)
        return get(text)
    raise RecipeError(
        f"recipe must be a built-in name ({', '.join(names())}), a path to a "
        f"TOML file or a Recipe, got {recipe!r}."
    )
