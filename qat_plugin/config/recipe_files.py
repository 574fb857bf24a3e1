"""Recipe files: TOML reading, field validation, `extends`, built-in lookup.

A recipe is a TOML file read with `tomllib`: loading one never executes
code. Every key is checked against the schema below (type and allowed
values) before the dataclasses are built, and every error names the file,
the section, the key and what is allowed.
"""

import dataclasses
import difflib
import importlib.util
import math
import os
import tomllib

from qat_plugin.config.constants import (
    NEVER_KEYWORD,
    TARGETS,
    UNITS,
    UNSTRUCTURED,
)
from qat_plugin.config.recipe import (
    ExportSettings,
    Pruning,
    QuantizationScheme,
    RecipeConfig,
    Schedule,
)
from qat_plugin.errors import RecipeError

# The recipe files ship in the `qat_plugin.recipes` package; its folder is
# found without importing it (it sits above the engine).
BUILTIN_DIR = importlib.util.find_spec("qat_plugin.recipes").submodule_search_locations[0]
EXPORT_TARGETS = TARGETS + ("any",)
PRUNING_SCHEDULES = ("constant", "polynomial")


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
        lambda v: v == NEVER_KEYWORD if isinstance(v, str) else v >= 0,
        f'a number >= 0 or "{NEVER_KEYWORD}"',
    )


def _structure_ok(value):
    if value == UNSTRUCTURED:
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
        "target": _one_of(EXPORT_TARGETS),
        "sparse_weights": (bool, lambda v: True, "true or false"),
        "allow_select_tf_ops": (bool, lambda v: True, "true or false"),
    }),
}
_TOP_LEVEL = {"description": (str, lambda v: True, "a string"),
              "extends": (str, lambda v: True, "a recipe name")}
_TOP_LEVEL.update({name: None for name in _SECTIONS})


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
    _validate(sections, _TOP_LEVEL, None, recipe.source)
    return _merged(recipe, sections, recipe.source, name=recipe.name)


def names():
    """Returns the sorted names of the built-in recipes."""
    return sorted(
        f[: -len(".toml")] for f in os.listdir(BUILTIN_DIR) if f.endswith(".toml")
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
    return os.path.join(BUILTIN_DIR, f"{name}.toml")


def load(path, cls=RecipeConfig, _seen=()):
    """Reads and validates the recipe file at `path` into a `cls`."""
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
    base = cls(name="")
    if "extends" in data:
        try:
            base = load(path_of(data["extends"]), cls, _seen + (path,))
        except RecipeError as error:
            raise RecipeError(f"Recipe {path}: 'extends': {error}") from None
    name = os.path.basename(path)
    name = name[: -len(".toml")] if name.endswith(".toml") else name
    return _merged(base, data, path, name=name)


def _merged(base, data, source, name):
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


def resolve(recipe, cls=RecipeConfig):
    """Returns a recipe from a name, a path or a recipe (returned as it is)."""
    if isinstance(recipe, RecipeConfig):
        return recipe
    if isinstance(recipe, (str, os.PathLike)):
        text = os.fspath(recipe)
        if text.endswith(".toml") or os.sep in text:
            return load(text, cls)
        return load(path_of(text), cls)
    raise RecipeError(
        f"recipe must be a built-in name ({', '.join(names())}), a path to a "
        f"TOML file or a Recipe, got {recipe!r}."
    )
