"""Recipes: named, documented quantization setups read from TOML files.

A recipe is a TOML file (read with `tomllib`; loading one never executes
code). The built-in ones ship in this package; `names()` lists them,
`get(name)` loads one and `load(path)` reads a user's file, which may start
from a built-in one with `extends = "int8"` and override its fields.

Example:

>>> from qat_plugin import recipes
>>> recipe = recipes.get("int8")
>>> recipe.quantization.per_channel
True
"""

import dataclasses
import difflib
import os
import tomllib

_HERE = os.path.dirname(os.path.abspath(__file__))


class RecipeError(ValueError):
    """A recipe file or name is invalid."""


@dataclasses.dataclass(frozen=True)
class QuantizationScheme:
    """Bit widths and granularity of the quantization."""

    weight_bits: int = 8
    per_channel: bool = True
    activation_bits: int = 8
    ema_decay: float = 0.99


# Allowed values per field: a type, and a check with its description.
_QUANTIZATION_FIELDS = {
    "weight_bits": (int, lambda v: v == 8, "8"),
    "per_channel": (bool, lambda v: True, "true or false"),
    "activation_bits": (int, lambda v: v in (8, 16), "8 or 16"),
    "ema_decay": ((int, float), lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
}
_TOP_LEVEL = {"description", "extends", "quantization"}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named quantization setup.

    Attributes:
        name: the recipe's name (the file name without `.toml`).
        description: what the recipe is for.
        quantization: the `QuantizationScheme`.
        source: the file it was read from.
    """

    name: str
    description: str = ""
    quantization: QuantizationScheme = QuantizationScheme()
    source: str = ""

    def replace(self, **quantization_fields):
        """Returns a copy with quantization fields overridden."""
        _validate_section(
            quantization_fields, _QUANTIZATION_FIELDS, "quantization", self.source
        )
        scheme = dataclasses.replace(self.quantization, **quantization_fields)
        return dataclasses.replace(self, quantization=scheme)


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
    _validate_section(data, {k: None for k in _TOP_LEVEL}, None, path)
    base = Recipe(name="")
    if "extends" in data:
        parent = data["extends"]
        if not isinstance(parent, str):
            raise RecipeError(f"Recipe {path}: 'extends' must be a recipe name.")
        base = load(path_of(parent), _seen + (path,))
    quantization = data.get("quantization", {})
    if not isinstance(quantization, dict):
        raise RecipeError(f"Recipe {path}: [quantization] must be a table.")
    _validate_section(quantization, _QUANTIZATION_FIELDS, "quantization", path)
    description = data.get("description", base.description)
    if not isinstance(description, str):
        raise RecipeError(f"Recipe {path}: 'description' must be a string.")
    return Recipe(
        name=os.path.basename(path)[: -len(".toml")]
        if path.endswith(".toml")
        else os.path.basename(path),
        description=description,
        quantization=dataclasses.replace(base.quantization, **quantization),
        source=path,
    )


def _validate_section(values, fields, section, source):
    where = f"[{section}]" if section else "top level"
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise RecipeError(
                f"Recipe {source or '<in memory>'}: unknown key '{key}' at "
                f"{where}. Allowed keys: {', '.join(sorted(fields))}.{hint}"
            )
        spec = fields[key]
        if spec is None:
            continue
        kind, check, allowed = spec
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise RecipeError(
                f"Recipe {source or '<in memory>'}: {where} '{key}' must be "
                f"{allowed}, got {value!r}."
            )
        if not check(value):
            raise RecipeError(
                f"Recipe {source or '<in memory>'}: {where} '{key}' must be "
                f"{allowed}, got {value!r}."
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
