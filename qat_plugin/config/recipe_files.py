"""Recipe files: TOML reading, `extends`, the built-in recipes' folder.

A recipe is a TOML file read with `tomllib`: loading one never executes
code. Every key is checked against `recipe.validate`'s schema before the
dataclasses are built, and every error names the file, the section, the
key and what is allowed. A file must be UTF-8, at most `MAX_BYTES` long and
nest at most `MAX_DEPTH` levels: a recipe is a few short sections, so
anything larger is refused before it can take minutes or the stack.
"""

import dataclasses
import difflib
import importlib.util
import os
import tomllib

from qat_plugin.config.recipe import TOP_LEVEL, RecipeConfig, merged, validate
from qat_plugin.errors import RecipeError

# The recipe files ship in the `qat_plugin.recipes` package; its folder is
# found without importing it (it sits above the engine).
BUILTIN_DIR = importlib.util.find_spec("qat_plugin.recipes").submodule_search_locations[0]

# The built-in recipes are under 2 KiB and two levels deep (sections of
# scalars); these limits leave ample room and refuse hostile files early.
MAX_BYTES = 1 << 20
MAX_DEPTH = 8


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
    data = read_toml(path)
    validate(data, TOP_LEVEL, None, path)
    base = cls(name="")
    if "extends" in data:
        try:
            base = load(path_of(data["extends"]), cls, _seen + (path,))
        except RecipeError as error:
            raise RecipeError(f"Recipe {path}: 'extends': {error}") from None
    name = os.path.basename(path)
    name = name[: -len(".toml")] if name.endswith(".toml") else name
    return merged(base, data, path, name=name)


def read_toml(path):
    """The TOML data of the file at `path`; every failure a `RecipeError` naming it."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise RecipeError(f"Recipe file {path} does not exist.") from None
    except (OSError, ValueError) as error:  # A folder, no permission, a NUL byte.
        raise RecipeError(f"Recipe file {path} cannot be read: {error}.") from None
    if len(raw) > MAX_BYTES:
        raise RecipeError(
            f"Recipe {path} is larger than {MAX_BYTES} bytes (1 MiB); a recipe "
            "is a few short sections: is this the right file?"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(
            f"Recipe {path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at "
            f"offset {error.start}); TOML files are UTF-8: save it as UTF-8."
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"Recipe {path} is not valid TOML: {error}") from None
    except RecursionError:
        data = None
    if data is None or _depth(data) > MAX_DEPTH:
        raise RecipeError(
            f"Recipe {path} nests tables or arrays deeper than {MAX_DEPTH} "
            "levels; a recipe holds sections of plain values."
        )
    return data


def _depth(value, limit=MAX_DEPTH):
    """How deep `value` nests (stops counting past `limit`)."""
    children = value.values() if isinstance(value, dict) else (
        value if isinstance(value, list) else ())
    if limit < 0:
        return 1
    return 1 + max((_depth(child, limit - 1) for child in children), default=0)


def resolve(recipe, cls=RecipeConfig):
    """Returns a recipe from a name, a path or a recipe (returned as it is)."""
    if isinstance(recipe, cls):
        return recipe
    if isinstance(recipe, RecipeConfig):  # The same data, with cls's methods.
        return cls(**{f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)})
    if isinstance(recipe, (str, os.PathLike)):
        text = os.fspath(recipe)
        if text.endswith(".toml") or os.sep in text:
            return load(text, cls)
        return load(path_of(text), cls)
    raise RecipeError(
        f"recipe must be a built-in name ({', '.join(names())}), a path to a "
        f"TOML file or a Recipe, got {recipe!r}."
    )
